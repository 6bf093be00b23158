"""The SupCon losses built on pair_stats, against the code they replace (DESIGN 2.1).

* ``fastiml.losses.SupConLoss`` against SupContrast's loss (``fastiml.reference``);
* ``fastiml.losses.pml.SupConLoss`` against pytorch-metric-learning's own ``SupConLoss``;
* ``PixelSupConLoss`` against a dense float64 computation of its definition, written here
  independently of ``fastiml.reference``.
Values and gradients are held to 1e-5 relative (the drop-in promise of DESIGN 2.1).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_scaled, generator
from fastiml import reference
from fastiml.losses import PixelSupConLoss, SupConLoss
from fastiml.losses import pml as fpml

REL = 1e-5


def value_and_grads(loss_fn, *inputs):
    """The loss and its gradients wrt ``inputs`` (fresh leaf copies)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def assert_same_loss(actual, expected, rtol=REL, name=""):
    (loss, grads), (r_loss, r_grads) = actual, expected
    assert loss.shape == r_loss.shape, f"{name}: loss shape {loss.shape} vs {r_loss.shape}"
    assert torch.isfinite(loss).all(), f"{name}: non-finite loss"
    assert_close_scaled(loss, r_loss, rtol, f"{name} loss")
    for i, (g, r) in enumerate(zip(grads, r_grads)):
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient of input {i}"
        assert_close_scaled(g, r, rtol, f"{name} grad {i}")


# ---------------------------------------------------------------- SupContrast's SupConLoss

def supcon_features(bsz, n_views, trailing, scale, dtype, g):
    x = torch.randn(bsz, n_views, *trailing, generator=g, dtype=torch.float64)
    flat = F.normalize(x.reshape(bsz, n_views, -1), dim=2) * scale  # SupContrast normalises
    return flat.reshape(x.shape).to(dtype)


def supcon_labels(bsz, g):
    """Repeated classes, plus class 99 with one sample (no positive when n_views == 1)."""
    lab = torch.randint(0, 3, (bsz,), generator=g)
    lab[-1] = 99
    return lab


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# scale 2.0: 2 max|s| = 81.6 > 80, pair_stats' online-max path; (2, 3, 2): trailing dims.
@pytest.mark.parametrize("trailing,scale", [((8,), 1.0), ((2, 3, 2), 1.0), ((8,), 2.0)],
                         ids=["D", "trailing_dims", "D_x2"])
@pytest.mark.parametrize("n_views", [1, 3])
@pytest.mark.parametrize("target", ["labels", "mask", "neither"])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcon_matches_supcontrast(contrast_mode, target, n_views, trailing, scale, dtype):
    g = generator(10)
    bsz = 13
    feats = supcon_features(bsz, n_views, trailing, scale, dtype, g)
    lab = supcon_labels(bsz, g)
    kwargs = {}
    if target == "labels":
        kwargs["labels"] = lab
    elif target == "mask":  # an arbitrary mask (not an equivalence relation) goes dense
        kwargs["mask"] = (torch.rand(bsz, bsz, generator=g) < 0.3).to(dtype)
    params = dict(temperature=0.1, contrast_mode=contrast_mode, base_temperature=0.07)
    ours = value_and_grads(lambda f: SupConLoss(**params)(f, **kwargs), feats)
    theirs = value_and_grads(lambda f: reference.supcontrast_loss(f, **kwargs, **params), feats)
    assert ours[0].dtype == dtype and ours[0].dim() == 0
    assert_same_loss(ours, theirs)


def supcontrast_by_definition(features, mask, temperature, contrast_mode, base_temperature):
    """SupContrast's loss written from its definition, anchor by anchor, in float64: for anchor
    a (view-major index), A(a) = every view but a, P(a) = those whose sample is a positive of a's
    by ``mask``; loss_a = -(T / T_base) / |P(a)| sum_{p in P(a)} log(exp(s_ap) / sum_{q in A(a)}
    exp(s_aq)), 0 when P(a) is empty; the mean over anchors."""
    bsz, n_views = features.shape[:2]
    views = features.double().reshape(bsz, n_views, -1)
    rows = [(v, i) for v in range(n_views) for i in range(bsz)]  # view-major
    anchors = rows[:bsz] if contrast_mode == "one" else rows
    losses = []
    for a, (va, ia) in enumerate(anchors):
        others = [(b, vb, ib) for b, (vb, ib) in enumerate(rows) if b != a]
        s = {b: (views[ia, va] @ views[ib, vb]) / temperature for b, vb, ib in others}
        log_denominator = torch.logsumexp(torch.stack([s[b] for b, _, _ in others]), 0)
        positives = [b for b, _, ib in others if mask[ia, ib] != 0]
        if positives:
            mean = sum(s[b] - log_denominator for b in positives) / len(positives)
            losses.append(-(temperature / base_temperature) * mean)
        else:
            losses.append(views.sum() * 0.0)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("n_views", [1, 3])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcon_mask_matches_the_definition(contrast_mode, n_views):
    """The dense ``mask=`` path (an arbitrary, asymmetric mask with empty rows) against the
    definition computed independently in float64: value and gradient."""
    g = generator(13)
    bsz = 9
    feats = supcon_features(bsz, n_views, (6,), 1.5, torch.float64, g)
    mask = (torch.rand(bsz, bsz, generator=g) < 0.3).double()
    mask[2] = 0.0  # an anchor sample without positives
    params = dict(temperature=0.1, contrast_mode=contrast_mode, base_temperature=0.07)
    assert_same_loss(value_and_grads(lambda f: SupConLoss(**params)(f, mask=mask), feats),
                     value_and_grads(lambda f: supcontrast_by_definition(f, mask, **params), feats),
                     rtol=1e-10)
    half = SupConLoss(**params)(feats.to(torch.bfloat16), mask=mask)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(supcontrast_by_definition(feats, mask, **params).item(),
                                        rel=0.05)


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcon_label_mask_equals_labels(contrast_mode):
    """``mask = labels == labels.T`` (the dense path) and ``labels`` (the fused one) agree."""
    g = generator(11)
    feats = supcon_features(16, 2, (10,), 1.0, torch.float64, g)
    lab = supcon_labels(16, g)
    mask = (lab[:, None] == lab[None, :]).double()
    loss = SupConLoss(contrast_mode=contrast_mode)
    assert_same_loss(value_and_grads(lambda f: loss(f, labels=lab), feats),
                     value_and_grads(lambda f: loss(f, mask=mask), feats), rtol=1e-10)


def test_supcon_defaults_match_supcontrast():
    """Default temperature / base_temperature / contrast_mode are SupContrast's (0.07, all)."""
    g = generator(12)
    feats = supcon_features(10, 2, (6,), 1.0, torch.float64, g)
    lab = supcon_labels(10, g)
    assert_close_scaled(SupConLoss()(feats, lab), reference.supcontrast_loss(feats, lab), 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_supcon_half_features_give_float32_loss(dtype):
    """Against SupContrast's loss in float64 on the same (rounded) features: the float32 loss to
    float32 rounding (REL), the gradient to the rounding of its own dtype (its epsilon, relative
    to the largest entry)."""
    g = generator(13)
    feats = supcon_features(20, 2, (16,), 1.0, torch.float32, g).to(dtype)
    lab = supcon_labels(20, g)
    loss, (grad,) = value_and_grads(lambda f: SupConLoss()(f, lab), feats)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    exact, (exact_grad,) = value_and_grads(lambda f: reference.supcontrast_loss(f, lab),
                                           feats.double())
    assert_close_scaled(loss, exact, REL, "loss")
    assert_close_scaled(grad, exact_grad, torch.finfo(dtype).eps, "grad")


# --------------------------------------------------------- pytorch-metric-learning's SupConLoss

@pytest.fixture(scope="module")
def pml_losses():
    # The package's __init__ does not import its ``losses`` submodule: ask for it by name.
    return pytest.importorskip("pytorch_metric_learning.losses")


def pml_pair(temperature, pml_losses):
    return fpml.SupConLoss(temperature=temperature), pml_losses.SupConLoss(temperature=temperature)


@pytest.mark.parametrize("temperature", [0.1, 0.05, 0.5])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pml_supcon_matches_pml(dtype, with_ref, temperature, pml_losses):
    """Random unnormalised embeddings; some anchors have no positive (label 98, 99 once)."""
    g = generator(14)
    emb = torch.randn(24, 16, generator=g, dtype=torch.float64).to(dtype) * 3
    lab = torch.randint(0, 4, (24,), generator=g)
    lab[:2] = torch.tensor([98, 99])
    ours, theirs = pml_pair(temperature, pml_losses)
    if with_ref:
        ref = torch.randn(19, 16, generator=g, dtype=torch.float64).to(dtype)
        ref_lab = torch.randint(0, 5, (19,), generator=g)
        a = value_and_grads(lambda e, r: ours(e, lab, ref_emb=r, ref_labels=ref_lab), emb, ref)
        b = value_and_grads(lambda e, r: theirs(e, lab, ref_emb=r, ref_labels=ref_lab), emb, ref)
    else:
        a = value_and_grads(lambda e: ours(e, lab), emb)
        b = value_and_grads(lambda e: theirs(e, lab), emb)
    assert a[0].dtype == dtype and a[0].item() > 0
    assert_same_loss(a, b)


@pytest.mark.parametrize("case", ["one_label", "no_positive_pair", "one_label_with_ref",
                                  "single_embedding"])
def test_pml_supcon_zero_loss_is_connected(case, pml_losses):
    """No negative pair or no positive pair: pml returns 0; so do we, and the 0 is still
    connected to the graph (backward runs and gives zero gradients)."""
    g = generator(15)
    emb = torch.randn(10, 8, generator=g, requires_grad=True)
    ours, theirs = pml_pair(0.1, pml_losses)
    kwargs = {}
    if case == "one_label":
        lab = torch.zeros(10, dtype=torch.long)
    elif case == "no_positive_pair":
        lab = torch.arange(10)
    elif case == "one_label_with_ref":
        lab = torch.full((10,), 3)
        kwargs = dict(ref_emb=torch.randn(7, 8, generator=g, requires_grad=True),
                      ref_labels=torch.full((7,), 3))
    else:
        emb = emb[:1].detach().requires_grad_()
        lab = torch.zeros(1, dtype=torch.long)
    loss = ours(emb, lab, **kwargs)
    assert loss.detach().item() == 0.0 == float(theirs(emb, lab, **kwargs).detach())
    assert loss.requires_grad and loss.grad_fn is not None
    leaves = [emb] + ([kwargs["ref_emb"]] if kwargs else [])
    for grad in torch.autograd.grad(loss, leaves):
        assert grad is not None and (grad == 0).all()


def test_pml_supcon_is_a_drop_in(pml_losses):
    """Same default temperature and call signature as pytorch-metric-learning's."""
    assert fpml.SupConLoss().temperature == pml_losses.SupConLoss().temperature == 0.1
    g = generator(16)
    emb, lab = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    assert_close_scaled(fpml.SupConLoss()(emb, lab), pml_losses.SupConLoss()(emb, lab), REL)


# ---------------------------------------------------------------------------- PixelSupConLoss

def dense_pixel_supcon(features, labels, *, tau, ignore_index, within_image, normalize,
                       reduction):
    """The definition of PixelSupConLoss, computed densely in float64: for each pixel i that
    is not ignored, over the other non-ignored pixels j (of the same image if within_image),
    loss_i = log sum_j exp(s_ij) - mean_{j: same label} s_ij, kept when i has a positive."""
    b, d, h, w = features.shape
    x = features.double().permute(0, 2, 3, 1).reshape(b * h * w, d)
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lab = labels.reshape(-1)
    image = torch.arange(b).repeat_interleave(h * w)
    n = x.shape[0]
    valid = lab != ignore_index
    counted = valid[:, None] & valid[None, :] & ~torch.eye(n, dtype=torch.bool)
    if within_image:
        counted &= image[:, None] == image[None, :]
    positive = counted & (lab[:, None] == lab[None, :])
    keep = positive.any(1)
    per_pixel = torch.zeros(n, dtype=torch.float64) + 0 * x.sum()  # connected to the graph
    if keep.any():
        s = x[keep] @ x.t() / tau
        lse = torch.logsumexp(s.masked_fill(~counted[keep], float("-inf")), dim=1)
        pos = positive[keep].double()
        per_pixel = per_pixel.index_put((keep.nonzero().flatten(),),
                                        lse - (s * pos).sum(1) / pos.sum(1))
    if reduction == "none":
        return per_pixel.view(b, h, w)
    if reduction == "sum":
        return per_pixel.sum()
    return per_pixel.sum() / max(int(keep.sum()), 1)


def pixel_labels(b, h, w, g, ignore_index, classes=3):
    lab = torch.randint(0, classes, (b, h, w), generator=g)
    lab[torch.rand(b, h, w, generator=g) < 0.2] = ignore_index
    return lab


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("within_image", [False, True])
@pytest.mark.parametrize("shape,ignore_index", [((2, 5, 3, 4), -1), ((3, 4, 2, 5), 255),
                                                ((1, 3, 1, 1), -1), ((2, 7, 1, 6), -1)])
def test_pixel_supcon_matches_dense(shape, ignore_index, within_image, reduction, normalize,
                                    dtype):
    g = generator(17)
    b, d, h, w = shape
    feats = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if not normalize:
        feats = feats * 0.5
    lab = pixel_labels(b, h, w, g, ignore_index)
    params = dict(tau=0.2, ignore_index=ignore_index, within_image=within_image,
                  normalize=normalize, reduction=reduction)
    module = PixelSupConLoss(**params)
    out = module(feats, lab)
    assert out.dtype == dtype
    assert out.shape == ((b, h, w) if reduction == "none" else ())
    if reduction == "none":
        assert (out[lab == ignore_index] == 0).all()
    # Per-pixel losses are summed with random weights, so that grad_output != 1 and differs
    # from pixel to pixel.
    weights = torch.randn(b, h, w, generator=g, dtype=torch.float64)
    reduce = (lambda t: (t.double() * weights).sum()) if reduction == "none" else (lambda t: t)
    ours = value_and_grads(lambda f: reduce(module(f, lab)), feats)
    theirs = value_and_grads(lambda f: reduce(dense_pixel_supcon(f, lab, **params)), feats)
    assert_same_loss(ours, theirs, rtol=1e-10 if dtype == torch.float64 else REL)


def test_pixel_supcon_within_image_differs_and_layouts_agree():
    """within_image really restricts the contrast; a channels-last feature map (a strided
    view after the pixel flattening) gives the contiguous result."""
    g = generator(18)
    feats = torch.randn(2, 6, 5, 4, generator=g)
    lab = pixel_labels(2, 5, 4, g, -1)
    across, within = PixelSupConLoss()(feats, lab), PixelSupConLoss(within_image=True)(feats, lab)
    assert not math.isclose(across.item(), within.item(), rel_tol=1e-4)
    cl = feats.to(memory_format=torch.channels_last)
    torch.testing.assert_close(PixelSupConLoss()(cl, lab), across, rtol=1e-6, atol=1e-6)


def test_pixel_supcon_no_positive_is_zero_and_connected():
    feats = torch.randn(1, 4, 2, 2, requires_grad=True)
    lab = torch.tensor([[[0, 1], [2, -1]]])
    loss = PixelSupConLoss()(feats, lab)
    assert loss.detach().item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, feats)
    assert (grad == 0).all()


# --------------------------------------------------------------------------------- bad inputs

def test_supcon_bad_inputs():
    f = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="features"):
        SupConLoss()(torch.randn(6, 8))
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()(f, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels or mask"):
        SupConLoss()(f, labels=torch.zeros(6, dtype=torch.long), mask=torch.eye(6))
    with pytest.raises(ValueError, match="contrast_mode"):
        SupConLoss(contrast_mode="both")
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(base_temperature=-1.0)


def test_pml_supcon_bad_inputs():
    emb = torch.randn(6, 4)
    lab = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="label"):
        fpml.SupConLoss()(emb, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb and ref_labels"):
        fpml.SupConLoss()(emb, lab, ref_emb=torch.randn(3, 4))
    with pytest.raises(ValueError, match="ref_emb and ref_labels"):
        fpml.SupConLoss()(emb, lab, ref_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="k_label"):
        fpml.SupConLoss()(emb, lab, ref_emb=torch.randn(3, 4),
                          ref_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        fpml.SupConLoss()(emb, None)
    with pytest.raises(ValueError, match="temperature"):
        fpml.SupConLoss(temperature=0)


def test_pixel_supcon_bad_inputs():
    feats = torch.randn(2, 4, 3, 5)
    with pytest.raises(ValueError, match="labels"):
        PixelSupConLoss()(feats, torch.zeros(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        PixelSupConLoss()(feats, torch.zeros(2, 1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        PixelSupConLoss()(torch.randn(2, 4, 15), torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        PixelSupConLoss(reduction="avg")
    with pytest.raises(ValueError, match="tau"):
        PixelSupConLoss(tau=0.0)
