"""SigLipLoss on fastiml.ops.siglip_loss (DESIGN 11), against open_clip's SigLipLoss (loaded as
test_clip loads its loss module) and an independent dense float64 formula written here: values
and the gradients of both features, logit_scale and logit_bias; half precision under the
low-precision rule; gradcheck, opcheck, torch.compile, bad input; two gloo ranks against
open_clip's own multi-rank loss run in the same processes.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import EPS32, assert_close_half_rule, assert_close_scaled, generator
from fastiml import ops
from fastiml.losses import SigLipLoss
from test_clip import open_clip_loss_module


@pytest.fixture(scope="module")
def open_clip_loss():
    return open_clip_loss_module()


def features(b, d, dtype, g, normalize=True, norm=1.0):
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return (norm * F.normalize(x, dim=1) if normalize else x).to(dtype)


def dense_siglip(image, text, scale, bias, offset=0):
    """sum_ij log(1 + exp(-z_ij l_ij)) / B from the materialised float64 logits, z = +1 on the
    pairs (i, i + offset)."""
    logits = scale * image.double() @ text.double().t() + bias
    z = -torch.ones_like(logits)
    z.diagonal(offset).fill_(1.0)
    return torch.logaddexp(torch.zeros_like(logits), -z * logits).sum() / image.shape[0]


def loss_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


NAMES = ("loss", "grad image", "grad text", "grad logit_scale", "grad logit_bias")


# ------------------------------------------------------------------------ against open_clip

@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
@pytest.mark.parametrize("b,d,scale,bias", [(1, 4, 10.0, -10.0), (7, 5, 1.0, 0.0),
                                            (33, 16, 100.0, -12.0), (300, 24, 10.0, -10.0),
                                            (513, 8, 30.0, 2.0)])
def test_siglip_matches_open_clip(b, d, scale, bias, dtype, rel, open_clip_loss):
    """Value and the four gradients, against open_clip's own loss; 300 and 513 rows cross the
    CPU kernel's tile borders (256) and leave partial tiles."""
    g = generator(40)
    image, text = features(b, d, dtype, g), features(b, d, dtype, g)
    scalars = torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)
    ours = loss_and_grads(SigLipLoss(), image, text, *scalars)
    theirs = loss_and_grads(open_clip_loss.SigLipLoss(), image, text, *scalars)
    assert ours[0].dtype == dtype and ours[0].dim() == 0
    for name, got, want in zip(NAMES, (ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert got.dtype == want.dtype, name
        assert_close_scaled(got, want, rel, name)


@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_matches_dense_float64(normalize):
    """An independent formula, float64 to 1e-10: unnormalised features too (logits in the
    hundreds: softplus far into both tails)."""
    g = generator(41)
    image, text = features(40, 9, torch.float64, g, normalize), features(40, 9, torch.float64,
                                                                         g, normalize)
    scalars = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    ours = loss_and_grads(SigLipLoss(), image, text, *scalars)
    exact = loss_and_grads(dense_siglip, image, text, *scalars)
    for name, got, want in zip(NAMES, (ours[0], *ours[1]), (exact[0], *exact[1])):
        assert_close_scaled(got, want, 1e-10, name)


@pytest.mark.parametrize("wanted", [(True, False, False, False), (False, True, False, False),
                                    (False, False, True, False), (False, False, False, True),
                                    (True, True, False, False)])
def test_siglip_gradients_of_any_subset(wanted):
    """Only some inputs require grad: each path of the backward (no feature gradient at all: no
    products beyond P) gives those gradients, with grad_output != 1."""
    g = generator(42)
    inputs = [features(270, 12, torch.float64, g), features(270, 12, torch.float64, g),
              torch.tensor(15.0, dtype=torch.float64), torch.tensor(-8.0, dtype=torch.float64)]
    for x, w in zip(inputs, wanted):
        x.requires_grad_(w)
    leaves = [x for x, w in zip(inputs, wanted) if w]
    got = torch.autograd.grad(2.5 * SigLipLoss()(*inputs), leaves)
    want = torch.autograd.grad(2.5 * dense_siglip(*inputs), leaves)
    for a, e in zip(got, want):
        assert_close_scaled(a, e, 1e-10)


def test_siglip_gradients_across_column_blocks(num_threads):
    """M = 4400 columns: more than one block of the CPU backward's dK (4096 columns), two
    threads each adding into its own block buffer; positives off the diagonal (offset 3000)."""
    num_threads(2)
    g = generator(51)
    inputs = [features(600, 8, torch.float64, g), features(4400, 8, torch.float64, g),
              torch.tensor(10.0, dtype=torch.float64), torch.tensor(-6.0, dtype=torch.float64)]
    leaves = [x.clone().requires_grad_() for x in inputs]
    got = torch.autograd.grad(ops.siglip_loss(*leaves, offset=3000), leaves)
    exact = [x.clone().requires_grad_() for x in inputs]
    want = torch.autograd.grad(dense_siglip(*exact, offset=3000) * 600, exact)
    for name, a, e in zip(NAMES[1:], got, want):
        assert_close_scaled(a, e, 1e-10, name)


def test_siglip_zero_incoming_gradient():
    """grad_output = 0 gives zero gradients (the CPU epilogue's weight 0 is not the forward)."""
    g = generator(50)
    inputs = [features(40, 6, torch.float64, g).requires_grad_(),
              features(40, 6, torch.float64, g).requires_grad_(),
              torch.tensor(10.0, dtype=torch.float64, requires_grad=True),
              torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)]
    for grad in torch.autograd.grad(0 * SigLipLoss()(*inputs), inputs):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_siglip_without_grad_and_floats(open_clip_loss):
    """Under no_grad (the loss only), with Python floats for the scalars, logit_bias=None and
    output_dict."""
    g = generator(43)
    image, text = features(20, 6, torch.float64, g), features(20, 6, torch.float64, g)
    want = open_clip_loss.SigLipLoss()(image, text, 10.0, -10.0)
    with torch.no_grad():
        out = SigLipLoss()(image, text, 10.0, -10.0, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    assert_close_scaled(out["contrastive_loss"], want, 1e-10)
    assert_close_scaled(SigLipLoss()(image, text, 10.0, None),
                        open_clip_loss.SigLipLoss()(image, text, 10.0, None), 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_siglip_half_features(dtype):
    """Half features, float32 scalars: float32 loss, half feature gradients, float32 scalar
    gradients, within the low-precision rule against the float64 values of the same inputs.
    The logits come from float32 products: their error is eps32 (scale |q||k| + |bias|), and
    each pair's term and weight move by it relative to themselves."""
    g = generator(44)
    image, text = features(300, 32, dtype, g), features(300, 32, dtype, g)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss, grads = loss_and_grads(SigLipLoss(), image, text, scale, bias)
    exact, exact_grads = loss_and_grads(SigLipLoss(), image.double(), text.double(),
                                        scale.double(), bias.double())
    assert loss.dtype == torch.float32
    assert [x.dtype for x in grads] == [dtype, dtype, torch.float32, torch.float32]
    arg_error = EPS32 * (10.0 + 10.0)
    assert_close_half_rule(loss, exact, torch.float32, "loss", arg_error=arg_error)
    for name, got, want, rounded_to in zip(NAMES[1:], grads, exact_grads,
                                           (dtype, dtype, torch.float32, torch.float32)):
        assert_close_half_rule(got, want, rounded_to, name, arg_error=arg_error)


def test_siglip_bad_arguments():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="same shape"):
        SigLipLoss()(q, torch.randn(5, 3), 1.0, 0.0)
    with pytest.raises(TypeError, match="image_features must be a Tensor"):
        SigLipLoss()(q.numpy(), q, 1.0, 0.0)
    with pytest.raises(TypeError, match="logit_scale|scale must be a real number"):
        SigLipLoss()(q, q, "10", 0.0)
    with pytest.raises(ValueError, match="scale must hold one value"):
        SigLipLoss()(q, q, torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="bias must be finite"):
        SigLipLoss()(q, q, 1.0, float("nan"))
    with pytest.raises(ValueError, match="rank=1, world_size=2"):
        SigLipLoss(rank=1, world_size=2)(q, q, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"offset must be in \[0, M - N\] = \[0, 2\]"):
        ops.siglip_loss(q, torch.randn(6, 3), 1.0, 0.0, offset=3)
    with pytest.raises(ValueError, match="k must be"):
        ops.siglip_loss(q, torch.randn(6, 3, dtype=torch.float64), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="offset must be in"):  # the op's own check
        torch.ops.fastiml.siglip_loss(q, q, torch.tensor(1.0), torch.tensor(0.0), 1)
    with pytest.raises(RuntimeError, match="scale must be a 0-dim Float"):
        torch.ops.fastiml.siglip_loss(q, q, torch.tensor([1.0]), torch.tensor(0.0), 0)
    with pytest.raises(RuntimeError, match="grad must be a 0-dim Float"):
        torch.ops.fastiml.siglip_loss_backward(torch.ones(1), q, q, torch.tensor(1.0),
                                               torch.tensor(0.0), 0, True, True, True)


# ---------------------------------------------------------------- op-level: gradcheck, opcheck

@pytest.mark.parametrize("offset", [0, 3])
def test_gradcheck(offset):
    g = generator(45)
    q = features(6, 4, torch.float64, g, norm=1.5).requires_grad_()
    k = features(9, 4, torch.float64, g, norm=1.5).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *xs: ops.siglip_loss(*xs, offset=offset), (q, k, scale, bias), eps=1e-6,
        atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    g = generator(46)
    q = torch.randn(11, 5, generator=g).to(dtype).requires_grad_()
    k = torch.randn(14, 5, generator=g).to(dtype).requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    torch.library.opcheck(torch.ops.fastiml.siglip_loss.default, (q, k, scale, bias, 2))
    for needs in ((True, True, True), (False, True, False), (False, False, True)):
        torch.library.opcheck(torch.ops.fastiml.siglip_loss_backward.default,
                              (torch.tensor(0.5), q.detach(), k.detach(), scale.detach(),
                               bias.detach(), 2, *needs),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = generator(47)
    image0, text0 = features(70, 6, torch.float32, g), features(70, 6, torch.float32, g)
    loss_fn = SigLipLoss()
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        image, text = image0.clone().requires_grad_(), text0.clone().requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        loss = fn(image, text, scale, bias)
        results.append((loss.detach(), *torch.autograd.grad(loss, [image, text, scale, bias])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_threads_agree(num_threads):
    """Deterministic for a given number of threads; other thread counts sum the same terms in
    other groupings (float64: 1e-12)."""
    g = generator(48)
    inputs = (features(700, 10, torch.float64, g), features(700, 10, torch.float64, g),
              torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    results = []
    for threads in (1, 2, 2):
        num_threads(threads)
        results.append(loss_and_grads(SigLipLoss(), *inputs))
    for a, b in zip((results[1][0], *results[1][1]), (results[2][0], *results[2][1])):
        assert torch.equal(a, b)
    for a, b in zip((results[0][0], *results[0][1]), (results[1][0], *results[1][1])):
        assert_close_scaled(a, b, 1e-12)


# ------------------------------------------------------------------------ two gloo ranks

WORLD = 2
B, D = 5, 6


def ddp_batch():
    g = generator(49)
    return (features(WORLD * B, D, torch.float64, g), features(WORLD * B, D, torch.float64, g),
            torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64))


def ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        image, text, scale, bias = ddp_batch()
        local = slice(rank * B, (rank + 1) * B)
        theirs = open_clip_loss_module()
        kwargs = dict(rank=rank, world_size=WORLD)
        results = {
            "ours": loss_and_grads(SigLipLoss(**kwargs), image[local], text[local], scale, bias),
            "open_clip": loss_and_grads(theirs.SigLipLoss(**kwargs), image[local], text[local],
                                        scale, bias),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, open_clip_loss):
    out = tmp_path_factory.mktemp("siglip_ddp")
    mp.spawn(ddp_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_match_open_clip(ddp_results):
    """open_clip's default neighbour exchange ("bidir") against fastiml's all-gather: the same
    loss and the same four gradients on every rank."""
    for rank, result in enumerate(ddp_results):
        (loss, grads), (want_loss, want_grads) = result["ours"], result["open_clip"]
        assert_close_scaled(loss, want_loss, 1e-10, f"rank {rank} loss")
        for name, got, want in zip(NAMES[1:], grads, want_grads):
            assert_close_scaled(got, want, 1e-10, f"rank {rank} {name}")


def test_two_ranks_equal_one_process(ddp_results):
    """Each rank's loss is its rows against all columns over its own B: the ranks' mean is the
    single-process loss (over WORLD * B), each rank's feature gradient (what DDP's all-reduce
    adds up before dividing by the world size) is WORLD times the single-process gradient of
    its slice, and the scalars' gradients average to the single-process ones."""
    image, text, scale, bias = ddp_batch()
    loss, grads = loss_and_grads(SigLipLoss(), image, text, scale, bias)
    assert_close_scaled(sum(r["ours"][0] for r in ddp_results) / WORLD, loss, 1e-10, "loss")
    for rank, result in enumerate(ddp_results):
        local = slice(rank * B, (rank + 1) * B)
        for i in (0, 1):
            assert_close_scaled(result["ours"][1][i] / WORLD, grads[i][local], 1e-10,
                                f"rank {rank} grad {i}")
    for i in (2, 3):
        assert_close_scaled(sum(r["ours"][1][i] for r in ddp_results) / WORLD, grads[i], 1e-10,
                            f"grad {NAMES[i + 1]}")


# ------------------------------------------------------------------------------ benchmark

def test_bench_siglip_main_in_process(tmp_path, open_clip_loss):
    """bench_siglip's providers compute the same loss; the table and the memory guard."""
    import json

    from benchmarks import bench_siglip, harness
    json_path = tmp_path / "r.json"
    argv = ["--sizes", "64", "--repeat", "1", "--threads", "1", "--in-process", "--no-csv",
            "--json", str(json_path)]
    assert bench_siglip.main(argv) == 0
    payload = json.loads(json_path.read_text())
    ours = [r for r in payload["results"] if r["provider"] == "fastiml"][0]
    assert ours["status"] == "ok" and ours["metrics"]["loss"] > 0
    assert ours["metrics"]["loss_rel_diff_vs_open_clip"] < 1e-5
    assert "| B | fastiml s | open_clip s |" in payload["table_markdown"]
    assert harness.memory_guard(bench_siglip.estimate_bytes("fastiml", 65536), 8) is None
    assert harness.memory_guard(bench_siglip.estimate_bytes("open_clip", 65536), 8).startswith(
        "skipped (needs ~")
