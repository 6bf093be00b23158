"""ClipLoss (single process: clip_lse, both directions in one pass; DESIGN 11) and InfoNCELoss
(pair_stats, DESIGN 9), against open_clip's ClipLoss and an independent dense float64 formula
written here; values and gradients, including the gradient of the learned ``logit_scale``;
clip_lse itself (non-square, large logits, gradcheck, opcheck); torch.compile; and two gloo
ranks against open_clip's ``local_loss + gather_with_grad`` run in the same processes.
"""
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import (assert_close_half_rule, assert_close_scaled, float32_arg_error, generator,
                      similarity_span)
from fastiml import ops
from fastiml.losses import ClipLoss, InfoNCELoss

REL = 1e-5


def open_clip_loss_module():
    """open_clip's ``loss`` module (loaded by path if the package cannot be imported whole:
    benchmarks.bench_clip.open_clip_loss_module), or a skip."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (a test extra)")
    from benchmarks.bench_clip import open_clip_loss_module as load
    return load()


@pytest.fixture(scope="module")
def open_clip_loss():
    return open_clip_loss_module()


def dense_info_nce(query, key, scale):
    """Per-row InfoNCE from the materialised float64 logits: logsumexp - diagonal."""
    logits = scale * query.double() @ key.double().t()
    return torch.logsumexp(logits, dim=1) - logits.diagonal()


def dense_clip(image, text, scale):
    return (dense_info_nce(image, text, scale).mean() + dense_info_nce(text, image, scale).mean()) / 2


def features(b, d, dtype, g, normalize=True):
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return (F.normalize(x, dim=1) if normalize else x).to(dtype)


def loss_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


# --------------------------------------------------------------------------------- ClipLoss

@pytest.mark.parametrize("dtype,rel", [(torch.float32, REL), (torch.float64, 1e-9)])
@pytest.mark.parametrize("b,d,scale", [(1, 4, 14.3), (7, 5, 1.0), (33, 16, 100.0),
                                       (300, 24, 30.0), (513, 8, 100.0)])
def test_clip_matches_open_clip(b, d, scale, dtype, rel, open_clip_loss):
    """Value and gradients wrt both features and logit_scale, against open_clip's own loss
    (300 and 513 rows: more than one row and column tile of the CPU kernel, partial tiles)."""
    g = generator(30)
    image, text = features(b, d, dtype, g), features(b, d, dtype, g)
    logit_scale = torch.tensor(scale, dtype=dtype)
    ours = loss_and_grads(ClipLoss(), image, text, logit_scale)
    theirs = loss_and_grads(open_clip_loss.ClipLoss(), image, text, logit_scale)
    assert ours[0].dtype == dtype and ours[0].dim() == 0
    # Each result is a difference of terms as large as the logits (up to `scale`): at b = 1 it is
    # exactly 0 for open_clip and a few roundings of lse (in `dtype`, at that scale) for us.
    rounding = 4 * torch.finfo(dtype).eps * scale
    for name, got, want in zip(("loss", "grad image", "grad text", "grad logit_scale"),
                               (ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert_close_scaled(got, want, rel, name, atol_floor=rounding)


@pytest.mark.parametrize("normalize", [True, False])
def test_clip_matches_dense_float64(normalize):
    """An independent formula, float64 to 1e-10: unnormalised features too (pair_stats'
    online-max path, large |s|)."""
    g = generator(31)
    image, text = features(20, 9, torch.float64, g, normalize), features(20, 9, torch.float64, g,
                                                                         normalize)
    logit_scale = torch.tensor(25.0, dtype=torch.float64)
    ours = loss_and_grads(ClipLoss(), image, text, logit_scale)
    exact = loss_and_grads(dense_clip, image, text, logit_scale)
    assert_close_scaled(ours[0], exact[0], 1e-10, "loss")
    for got, want in zip(ours[1], exact[1]):
        assert_close_scaled(got, want, 1e-10, "grad")


def test_clip_output_dict_logit_bias_and_float_scale(open_clip_loss):
    g = generator(32)
    image, text = features(10, 6, torch.float64, g), features(10, 6, torch.float64, g)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    out = ClipLoss()(image, text, torch.tensor(10.0, dtype=torch.float64), logit_bias=bias,
                     output_dict=True)
    want = open_clip_loss.ClipLoss()(image, text, 10.0, logit_bias=bias.detach(),
                                     output_dict=True)
    assert list(out) == ["contrastive_loss"]
    assert_close_scaled(out["contrastive_loss"], want["contrastive_loss"], 1e-10)
    (grad_bias,) = torch.autograd.grad(out["contrastive_loss"], bias)
    assert grad_bias.item() == 0.0  # a shift of every logit changes no softmax
    assert_close_scaled(ClipLoss()(image, text, 10.0), want["contrastive_loss"], 1e-10)


@pytest.mark.parametrize("scale", [16.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_half_features(dtype, scale):
    """Half features, float32 scale (autocast's usual mix): float32 loss, half gradients, loss
    and gradients within the low-precision rule (conftest.assert_close_half_rule) against the
    float64 values of the same inputs. ClipLoss multiplies the features by the scale in their
    own dtype across ranks (pair_stats); in one process clip_lse applies it to the float32
    products, so the bound is the kernels' own (float32 similarities) at either scale."""
    g = generator(33)
    image, text = features(64, 32, dtype, g), features(64, 32, dtype, g)
    logit_scale = torch.tensor(scale)
    loss, (gi, gt) = loss_and_grads(lambda i, t: ClipLoss()(i, t, logit_scale), image, text)
    assert loss.dtype == torch.float32 and gi.dtype == dtype and gt.dtype == dtype
    exact, (ei, et) = loss_and_grads(lambda i, t: dense_clip(i, t, logit_scale.double()),
                                     image.double(), text.double())
    span = similarity_span(image, text, 1 / scale)
    arg_error = float32_arg_error(span, 64)
    # The loss is a mean of (lse_i - s_ii) over rows and both directions: two argument errors.
    assert_close_half_rule(loss, exact, torch.float32, "loss", arg_error=2 * arg_error,
                           log_domain=True)
    assert_close_half_rule(gi, ei, dtype, "grad image", arg_error=arg_error)
    assert_close_half_rule(gt, et, dtype, "grad text", arg_error=arg_error)


def test_clip_bad_arguments():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="local_loss=True and gather_with_grad=True"):
        ClipLoss(world_size=2, rank=0)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="rank=1, world_size=2"):
        ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2)(
            torch.randn(4, 3), torch.randn(4, 3), 1.0)


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False),
                                    (False, False, True)])
def test_clip_gradients_of_any_subset(wanted):
    """Only some inputs require grad (the scale alone still needs G K), grad_output != 1."""
    g = generator(37)
    inputs = [features(270, 12, torch.float64, g), features(270, 12, torch.float64, g),
              torch.tensor(30.0, dtype=torch.float64)]
    for x, w in zip(inputs, wanted):
        x.requires_grad_(w)
    leaves = [x for x, w in zip(inputs, wanted) if w]
    got = torch.autograd.grad(2.5 * ClipLoss()(*inputs), leaves)
    want = torch.autograd.grad(2.5 * dense_clip(*inputs), leaves)
    for a, e in zip(got, want):
        assert_close_scaled(a, e, 1e-10)


def test_clip_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = generator(38)
    image0, text0 = features(70, 6, torch.float32, g), features(70, 6, torch.float32, g)
    loss_fn = ClipLoss()
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        image, text = image0.clone().requires_grad_(), text0.clone().requires_grad_()
        scale = torch.tensor(14.0, requires_grad=True)
        loss = fn(image, text, scale)
        results.append((loss.detach(), *torch.autograd.grad(loss, [image, text, scale])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_clip_threads_agree(num_threads):
    """Deterministic for a given number of threads; other thread counts merge the columns'
    partial sums in other groupings (float64: 1e-12)."""
    g = generator(39)
    inputs = (features(700, 10, torch.float64, g), features(700, 10, torch.float64, g),
              torch.tensor(20.0, dtype=torch.float64))
    results = []
    for threads in (1, 2, 2):
        num_threads(threads)
        results.append(loss_and_grads(ClipLoss(), *inputs))
    for a, b in zip((results[1][0], *results[1][1]), (results[2][0], *results[2][1])):
        assert torch.equal(a, b)
    for a, b in zip((results[0][0], *results[0][1]), (results[1][0], *results[1][1])):
        assert_close_scaled(a, b, 1e-12)


# -------------------------------------------------------------------------------- clip_lse

@pytest.mark.parametrize("norm,scale", [(1.0, 30.0), (3.0, 100.0)])
def test_clip_lse_matches_dense_non_square(norm, scale):
    """Rows, columns and diagonal of a non-square S (300 x 530: partial tiles both ways),
    weighed by random upstream gradients; norm 3 at scale 100 puts S in [-900, 900], where only
    running maxima (no fixed shift) keep the exponentials finite."""
    g = generator(50)
    q, k = features(300, 16, torch.float64, g) * norm, features(530, 16, torch.float64, g) * norm
    w_row = torch.randn(300, generator=g, dtype=torch.float64)
    w_col = torch.randn(530, generator=g, dtype=torch.float64)
    w_diag = torch.randn(300, generator=g, dtype=torch.float64)
    t = torch.tensor(scale, dtype=torch.float64)

    def weighed(out):
        return (out[0] * w_row).sum() + (out[1] * w_col).sum() + (out[2] * w_diag).sum()

    def dense(q, k, t):
        s = t * q @ k.t()
        return torch.logsumexp(s, 1), torch.logsumexp(s, 0), s.diagonal()

    leaves = [x.clone().requires_grad_() for x in (q, k, t)]
    got = ops.clip_lse(*leaves)
    want = dense(*[x.detach().clone().requires_grad_() for x in (q, k, t)])
    for name, a, e in zip(("row_lse", "col_lse", "diag"), got, want):
        assert a.dtype == torch.float64
        assert_close_scaled(a, e, 1e-12, name)
    got_grads = torch.autograd.grad(weighed(got), leaves)
    exact_leaves = [x.clone().requires_grad_() for x in (q, k, t)]
    want_grads = torch.autograd.grad(weighed(dense(*exact_leaves)), exact_leaves)
    for name, a, e in zip(("grad q", "grad k", "grad scale"), got_grads, want_grads):
        assert_close_scaled(a, e, 1e-10, name)


def test_clip_lse_gradients_across_column_blocks(num_threads):
    """M = 4400 columns: more than one block of the CPU backward's dK (16 tiles, 4096 columns),
    two threads each adding into its own block buffer (600 rows: three row tiles)."""
    num_threads(2)
    g = generator(53)
    q, k = features(600, 8, torch.float64, g), features(4400, 8, torch.float64, g)
    w = torch.randn(4400, generator=g, dtype=torch.float64)

    def weighed(out):
        return out[0].sum() + (out[1] * w).sum() - 3 * out[2].sum()

    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    got = torch.autograd.grad(weighed(ops.clip_lse(*leaves, 20.0)), leaves)
    exact_leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    s = 20.0 * exact_leaves[0] @ exact_leaves[1].t()
    want = torch.autograd.grad(weighed((torch.logsumexp(s, 1), torch.logsumexp(s, 0),
                                        s.diagonal())), exact_leaves)
    for name, a, e in zip(("grad q", "grad k"), got, want):
        assert_close_scaled(a, e, 1e-10, name)


def test_clip_lse_gradcheck():
    g = generator(51)
    q = features(6, 4, torch.float64, g).requires_grad_()
    k = features(9, 4, torch.float64, g).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *xs: (lambda r, c, d: r.sum() + (c * w).sum() - 2 * d.sum())(*ops.clip_lse(*xs)),
        (q, k, scale), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_lse_opcheck(dtype):
    g = generator(52)
    q = torch.randn(11, 5, generator=g).to(dtype).requires_grad_()
    k = torch.randn(13, 5, generator=g).to(dtype).requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    torch.library.opcheck(torch.ops.fastiml.clip_lse.default, (q, k, scale))
    row, col, _ = ops.clip_lse(q.detach(), k.detach(), scale.detach())
    grads = (torch.randn(11, generator=g), torch.randn(13, generator=g),
             torch.randn(11, generator=g))
    for needs in ((True, True, True), (False, True, False), (False, False, True)):
        torch.library.opcheck(torch.ops.fastiml.clip_lse_backward.default,
                              (*grads, q.detach(), k.detach(), scale.detach(), row, col, *needs),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def test_clip_lse_bad_arguments():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k must be \[M, 3\]"):
        ops.clip_lse(q, torch.randn(4, 2), 1.0)
    with pytest.raises(TypeError, match="q must be float32"):
        ops.clip_lse(q.long(), q.long(), 1.0)
    with pytest.raises(ValueError, match="scale must hold one value"):
        ops.clip_lse(q, q, torch.ones(3))
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.clip_lse(q, q, float("inf"))
    with pytest.raises(RuntimeError, match="scale must be a 0-dim Float"):  # the op's own check
        torch.ops.fastiml.clip_lse(q, q, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="col_lse must be Float"):
        torch.ops.fastiml.clip_lse_backward(torch.zeros(4), torch.zeros(4), torch.zeros(4), q,
                                            q, torch.tensor(1.0), torch.zeros(4),
                                            torch.zeros(3), True, True, True)


# ----------------------------------------------------------------------------- InfoNCELoss

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_matches_dense(reduction):
    g = generator(34)
    query, key = features(17, 8, torch.float64, g), features(17, 8, torch.float64, g)
    weights = torch.randn(17, generator=g, dtype=torch.float64)  # grad_output != 1 for "none"
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda t: (t * weights).sum()}[
        reduction]
    ours = loss_and_grads(lambda q, k: reduce(InfoNCELoss(0.07, reduction)(q, k)), query, key)
    exact = loss_and_grads(lambda q, k: reduce(dense_info_nce(q, k, 1 / 0.07)), query, key)
    assert_close_scaled(ours[0], exact[0], 1e-10, "loss")
    for got, want in zip(ours[1], exact[1]):
        assert_close_scaled(got, want, 1e-10, "grad")


def test_info_nce_learned_temperature_gets_its_gradient():
    g = generator(35)
    query, key = features(12, 5, torch.float64, g), features(12, 5, torch.float64, g)
    temperature = torch.tensor(0.2, dtype=torch.float64)
    ours = loss_and_grads(lambda t: InfoNCELoss(t)(query, key), temperature)
    exact = loss_and_grads(lambda t: dense_info_nce(query, key, 1 / t).mean(), temperature)
    assert_close_scaled(ours[1][0], exact[1][0], 1e-10, "grad temperature")


def test_info_nce_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)
    with pytest.raises(ValueError, match="reduction"):
        InfoNCELoss(reduction="avg")
    with pytest.raises(ValueError, match="query and key"):
        InfoNCELoss()(torch.randn(4, 3), torch.randn(4, 2))


# ------------------------------------------------------------------------ two gloo ranks

WORLD = 2
B, D = 5, 6


def ddp_batch():
    g = generator(36)
    return (features(WORLD * B, D, torch.float64, g), features(WORLD * B, D, torch.float64, g),
            torch.tensor(12.5, dtype=torch.float64))


def ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        image, text, scale = ddp_batch()
        local = slice(rank * B, (rank + 1) * B)
        theirs_module = open_clip_loss_module()
        kwargs = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
        results = {
            "ours": loss_and_grads(ClipLoss(**kwargs), image[local], text[local], scale),
            "open_clip": loss_and_grads(theirs_module.ClipLoss(**kwargs), image[local],
                                        text[local], scale),
            "info_nce": loss_and_grads(lambda q, k: InfoNCELoss(0.1)(q, k), image[local],
                                       text[local]),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, open_clip_loss):
    out = tmp_path_factory.mktemp("clip_ddp")
    mp.spawn(ddp_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_match_open_clip_local_loss_gather_with_grad(ddp_results):
    for rank, result in enumerate(ddp_results):
        (loss, grads), (want_loss, want_grads) = result["ours"], result["open_clip"]
        assert_close_scaled(loss, want_loss, 1e-10, f"rank {rank} loss")
        for name, got, want in zip(("image", "text", "scale"), grads, want_grads):
            assert_close_scaled(got, want, 1e-10, f"rank {rank} grad {name}")


def test_two_ranks_equal_one_process(ddp_results):
    """Local rows against all columns: the ranks' mean loss is the single-process loss, and
    the sum over ranks of each rank's gradient (what DDP's all-reduce adds up, before its
    division by the world size) is the single-process gradient of that rank's slice."""
    image, text, scale = ddp_batch()
    for name, fn, inputs in (("ours", ClipLoss(), (image, text, scale)),
                             ("info_nce", InfoNCELoss(0.1), (image, text))):
        loss, grads = loss_and_grads(fn, *inputs)
        mean = sum(r[name][0] for r in ddp_results) / WORLD
        assert_close_scaled(mean, loss, 1e-10, f"{name} loss")
        for rank, result in enumerate(ddp_results):
            local = slice(rank * B, (rank + 1) * B)
            for i in (0, 1):  # features: each rank holds only its slice's gradient
                assert_close_scaled(result[name][1][i] / WORLD, grads[i][local], 1e-10,
                                    f"{name} rank {rank} grad {i}")
        if name == "ours":  # the shared scale: the ranks' gradients average to the global one
            mean_scale_grad = sum(r[name][1][2] for r in ddp_results) / WORLD
            assert_close_scaled(mean_scale_grad, grads[2], 1e-10, "grad logit_scale")
