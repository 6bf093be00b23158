"""Tests of fastiml.models: shapes, contracts, stochastic depth, two-stage freezing, gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastiml.models import MPCNet, NCLNet, build_resnet, resnet18, resnet50
from fastiml.models.layers import DropPath, upsample_crop

SIZES = [(64, 80), (70, 66)]


def tiny_ncl(**kw):
    kw = {"base_width": 8, "proj_dim": 16, "decoder_channels": 16, "aspp_rates": (1, 2), **kw}
    return NCLNet(**kw)


def tiny_mpc(**kw):
    kw = {"base_width": 8, "embed_dim": 16, "head_channels": 16, **kw}
    return MPCNet(**kw)


def ceil_div(a, b):
    return -(-a // b)


# ------------------------------------------------------------------------------------ ResNet


@pytest.mark.parametrize("ctor,expansion", [(resnet18, 1), (resnet50, 4)])
@pytest.mark.parametrize("output_stride,strides", [(32, [4, 8, 16, 32]), (16, [4, 8, 16, 16])])
def test_resnet_stage_shapes(ctor, expansion, output_stride, strides):
    net = ctor(base_width=8, output_stride=output_stride)
    assert net.channels == [8 * expansion, 16 * expansion, 32 * expansion, 64 * expansion]
    assert net.strides == strides
    feats = net(torch.rand(2, 3, 64, 96))
    assert len(feats) == 4
    for f, c, s in zip(feats, net.channels, strides):
        assert f.shape == (2, c, 64 // s, 96 // s)


def test_resnet18_parameter_count_matches_standard():
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in the classifier.
    assert sum(p.numel() for p in resnet18().parameters()) == 11_176_512


def test_resnet_drop_path_rates_increase_linearly():
    net = build_resnet("resnet34", base_width=8, drop_path=0.3)
    rates = [m.p for m in net.modules() if isinstance(m, DropPath)]
    assert len(rates) == 3 + 4 + 6 + 3
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    steps = torch.tensor(rates).diff()
    assert torch.allclose(steps, torch.full_like(steps, 0.3 / 15))


def test_drop_path_per_sample_and_identity_in_eval():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    # each sample is either dropped entirely or kept and rescaled by 1 / (1 - p)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    dp.eval()
    assert torch.equal(dp(x), x)
    with pytest.raises(ValueError, match="p"):
        DropPath(1.0)


def test_upsample_crop_keeps_cells_aligned():
    # A linear ramp over cells: after exact ×4 bilinear upsampling, the mean over the 4 pixels of
    # an interior cell is the cell's value (pixel centres are symmetric about the cell centre).
    ramp = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 1, 6, 5).contiguous()
    up = upsample_crop(ramp, 4, (22, 19))
    assert up.shape == (1, 1, 22, 19)
    cell_means = F.avg_pool2d(up[..., :20, :16], 4)[0, 0, :, 0]
    assert torch.allclose(cell_means[1:-1], torch.arange(1.0, 4.0))


# ------------------------------------------------------------------------------------ NCLNet


@pytest.mark.parametrize("hw", SIZES)
def test_nclnet_outputs(hw):
    torch.manual_seed(0)
    h, w = hw
    net = tiny_ncl()
    out = net(torch.rand(2, 3, h, w))
    assert set(out) == {"proj_a", "proj_b", "logit_a", "logit_b", "pred_mask", "feat"}
    hs, ws = ceil_div(h, 4), ceil_div(w, 4)
    for k in ("proj_a", "proj_b"):
        assert out[k].shape == (2, 16, hs, ws)
        assert torch.allclose(out[k].norm(dim=1), torch.ones(2, hs, ws), atol=1e-5)
    assert out["feat"].shape == (2, 16, hs, ws)
    for k in ("logit_a", "logit_b", "pred_mask"):
        assert out[k].shape == (2, 1, h, w)
    for v in out.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    p = out["pred_mask"]
    assert p.min() >= 0 and p.max() <= 1
    expected = 0.5 * (torch.sigmoid(out["logit_a"]) + torch.sigmoid(out["logit_b"]))
    assert torch.allclose(p, expected)
    # the two branches are separate heads, not one head read twice
    assert not torch.allclose(out["proj_a"], out["proj_b"])


def test_nclnet_eval_is_deterministic():
    torch.manual_seed(0)
    net = tiny_ncl(drop_path=0.3).eval()
    x = torch.rand(2, 3, 64, 64)
    a, b = net(x), net(x)
    assert torch.equal(a["pred_mask"], b["pred_mask"])


def test_nclnet_gradients_reach_every_parameter_through_both_branches():
    torch.manual_seed(0)
    net = tiny_ncl().train()
    out = net(torch.rand(2, 3, 64, 80))
    g = {k: torch.randn_like(out[k]) for k in ("proj_a", "proj_b", "logit_a", "logit_b")}
    sum((out[k] * g[k]).sum() for k in g).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_nclnet_branch_a_loss_does_not_touch_branch_b():
    torch.manual_seed(0)
    net = tiny_ncl().train()
    out = net(torch.rand(2, 3, 64, 64))
    (out["proj_a"].sum() + out["logit_a"].sum()).backward()
    assert all(p.grad is None for p in net.branch_b.parameters())
    assert all(p.grad is not None for p in net.branch_a.parameters())
    assert all(p.grad is not None for p in net.decoder.parameters())


class LowHighBackbone(nn.Module):
    """Minimal custom NCL backbone: low map at stride ``low_stride``, high map at stride 16."""

    def __init__(self, low_stride=4):
        super().__init__()
        self.low = nn.Conv2d(3, 6, low_stride, stride=low_stride)
        self.high = nn.Conv2d(6, 10, 16 // low_stride, stride=16 // low_stride)
        self.low_channels, self.high_channels, self.size_divisor = 6, 10, 16

    def forward(self, x):
        low = self.low(x)
        return low, self.high(low)


@pytest.mark.parametrize("low_stride", [4, 8])
def test_nclnet_custom_backbone(low_stride):
    torch.manual_seed(0)
    bb = LowHighBackbone(low_stride)
    net = tiny_ncl(backbone=bb)
    assert net.backbone is bb
    h, w = 70, 66
    out = net(torch.rand(2, 3, h, w))
    hs, ws = ceil_div(h, low_stride), ceil_div(w, low_stride)
    assert out["proj_a"].shape == (2, 16, hs, ws)
    assert out["logit_b"].shape == (2, 1, h, w)
    out["pred_mask"].sum().backward()
    assert bb.low.weight.grad is not None and bb.high.weight.grad.abs().sum() > 0


def test_nclnet_rejects_backbone_breaking_contract():
    class NoAttrs(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="backbone"):
        tiny_ncl(backbone=NoAttrs())

    class BadStride(LowHighBackbone):
        def forward(self, x):
            low, high = super().forward(x)
            return low[..., :-1, :], high  # does not tile the input any more

    net = tiny_ncl(backbone=BadStride())
    with pytest.raises(ValueError, match="backbone"):
        net(torch.rand(1, 3, 64, 64))


# ------------------------------------------------------------------------------------ MPCNet


@pytest.mark.parametrize("hw", SIZES)
def test_mpcnet_outputs(hw):
    torch.manual_seed(0)
    h, w = hw
    net = tiny_mpc()
    out = net(torch.rand(2, 3, h, w))
    assert set(out) == {"embeddings", "logit", "pred_mask"}
    emb = out["embeddings"]
    assert len(emb) == 4
    for e, s in zip(emb, (4, 8, 16, 32)):
        assert e.shape == (2, 16, ceil_div(h, s), ceil_div(w, s))
        assert e.dtype == torch.float32 and torch.isfinite(e).all()
    # embeddings are not normalised (the loss normalises)
    assert not torch.allclose(emb[0].norm(dim=1), torch.ones(()), atol=1e-2)
    assert out["logit"].shape == out["pred_mask"].shape == (2, 1, h, w)
    assert torch.allclose(out["pred_mask"], torch.sigmoid(out["logit"]))
    assert out["pred_mask"].min() >= 0 and out["pred_mask"].max() <= 1


def test_mpcnet_stochastic_depth_views():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    net = tiny_mpc(drop_path=0.3).train()
    a, b = net(x)["embeddings"], net(x)["embeddings"]
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[3], b[3])
    net.eval()
    a, b = net(x)["embeddings"], net(x)["embeddings"]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # without stochastic depth, train-mode passes agree: the difference above is drop-path's
    net0 = tiny_mpc(drop_path=0.0).train()
    a, b = net0(x)["embeddings"], net0(x)["embeddings"]
    assert all(torch.allclose(u, v) for u, v in zip(a, b))


def test_mpcnet_stage1_gradients():
    torch.manual_seed(0)
    net = tiny_mpc(drop_path=0.0).train()  # no dropped samples: every block must get a gradient
    out = net(torch.rand(2, 3, 64, 80))
    assert not out["logit"].requires_grad  # the head is not trained in stage 1
    sum((e * torch.randn_like(e)).sum() for e in out["embeddings"]).backward()
    trainable = {id(p) for p in net.trainable_parameters()}
    for name, p in net.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name.startswith("head.") and p.grad is None, name
    assert len(trainable) == sum(1 for n, _ in net.named_parameters() if not n.startswith("head."))


def test_mpcnet_stage2_updates_only_the_head():
    torch.manual_seed(0)
    net = tiny_mpc(drop_path=0.3)
    net.set_stage(2)
    net.train()  # must not put the frozen part back into training mode
    frozen = (net.backbone, net.fpn, net.embed)
    assert all(not m.training for f in frozen for m in f.modules())
    assert net.head.training
    assert all(not p.requires_grad for f in frozen for p in f.parameters())
    head_ids = {id(p) for p in net.head.parameters()}
    assert {id(p) for p in net.trainable_parameters()} == head_ids

    before_frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
    before_head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("head.")}
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    for _ in range(2):
        out = net(x)
        assert not any(e.requires_grad for e in out["embeddings"])
        loss = F.binary_cross_entropy_with_logits(out["logit"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    for k, v in before_frozen.items():  # weights AND BatchNorm running stats / counters
        assert torch.equal(after[k], v), k
    changed = [k for k, v in before_head.items() if not torch.equal(after[k], v)]
    assert any(k.endswith("running_mean") for k in changed)
    assert all(k in changed for k, p in net.head.named_parameters(prefix="head"))
    # stage-2 forward is deterministic in train mode too (frozen drop-path, frozen BN)
    e1, e2 = net(x)["embeddings"], net(x)["embeddings"]
    assert all(torch.equal(u, v) for u, v in zip(e1, e2))

    net.set_stage(1)
    assert net.backbone.training and all(p.requires_grad for p in net.backbone.parameters())
    assert not any(p.requires_grad for p in net.head.parameters())


class PyramidBackbone(nn.Module):
    """Minimal custom MPC backbone: four strided convs (strides 4, 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        self.channels = [5, 6, 7, 8]
        self.convs = nn.ModuleList([nn.Conv2d(3, 5, 4, 4), nn.Conv2d(5, 6, 2, 2),
                                    nn.Conv2d(6, 7, 2, 2), nn.Conv2d(7, 8, 2, 2)])
        self.grad_modes = []

    def forward(self, x):
        self.grad_modes.append(torch.is_grad_enabled())
        out = []
        for c in self.convs:
            x = c(x)
            out.append(x)
        return out


def test_mpcnet_custom_backbone():
    torch.manual_seed(0)
    bb = PyramidBackbone()
    net = tiny_mpc(backbone=bb, fpn_channels=12)
    out = net(torch.rand(2, 3, 70, 66))
    assert [tuple(e.shape) for e in out["embeddings"]] == [
        (2, 16, 18, 17), (2, 16, 9, 9), (2, 16, 5, 5), (2, 16, 3, 3)]
    assert out["logit"].shape == (2, 1, 70, 66)
    sum(e.sum() for e in out["embeddings"]).backward()
    assert all(p.grad is not None for p in bb.parameters())
    assert bb.grad_modes == [True]
    # stage 2 runs the frozen backbone without building a graph
    net.set_stage(2)
    net(torch.rand(2, 3, 64, 64))["logit"].sum().backward()
    assert bb.grad_modes == [True, False]
    assert net.head[-1].weight.grad is not None
    with pytest.raises(ValueError, match="backbone"):
        tiny_mpc(backbone=nn.Conv2d(3, 3, 1))


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("build,kw,name", [
    (tiny_ncl, {"encoder": "resnet19"}, "encoder"),
    (tiny_mpc, {"encoder": "vit"}, "encoder"),
    (tiny_ncl, {"proj_dim": 0}, "proj_dim"),
    (tiny_ncl, {"proj_dim": -4}, "proj_dim"),
    (tiny_ncl, {"base_width": 0}, "base_width"),
    (tiny_ncl, {"aspp_rates": ()}, "aspp_rates"),
    (tiny_ncl, {"drop_path": 1.0}, "drop_path"),
    (tiny_ncl, {"decoder_channels": 0}, "decoder_channels"),
    (tiny_mpc, {"embed_dim": 0}, "embed_dim"),
    (tiny_mpc, {"head_channels": -1}, "head_channels"),
    (tiny_mpc, {"drop_path": -0.1}, "drop_path"),
])
def test_bad_constructor_arguments(build, kw, name):
    with pytest.raises(ValueError, match=name):
        build(**kw)


@pytest.mark.parametrize("build", [tiny_ncl, tiny_mpc])
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 4, 64, 64), (2, 1, 64, 64), (1, 2, 3, 64, 64)])
def test_bad_input_shapes(build, shape):
    net = build()
    with pytest.raises(ValueError, match="x "):
        net(torch.rand(*shape))


def test_bad_stage_and_output_stride():
    with pytest.raises(ValueError, match="stage"):
        tiny_mpc().set_stage(3)
    with pytest.raises(ValueError, match="output_stride"):
        build_resnet("resnet18", output_stride=4)


def test_nclnet_fits_one_batch_from_scratch():
    # Random init must be trainable: a few Adam steps fit a bright square on noise.
    torch.manual_seed(0)
    y = torch.zeros(2, 1, 48, 48)
    y[0, :, 8:30, 14:40] = 1
    y[1, :, 20:46, 4:24] = 1
    x = torch.rand(2, 3, 48, 48) * 0.5 + 0.3 * y
    net = tiny_ncl()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(12):
        out = net(x)
        loss = sum(F.binary_cross_entropy_with_logits(out[k], y) for k in ("logit_a", "logit_b"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
