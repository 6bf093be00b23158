"""fastiml.ops.pivot_consistency against fastiml.reference (DESIGN 2.3, STYLE rule 11).

The kernel computes the Jeffreys divergence through the closed form
``(sigmoid(a) - sigmoid(b)) * (a - b)`` and reads each pixel's patch class by index; the
reference writes the two KL divergences with log-sigmoids and upsamples ``klass`` -- an
independent formula and an independent indexing, so agreement checks both.
"""
import pytest
import torch

from conftest import (LEVELS, assert_close_half_rule, assert_close_scaled, float32_arg_error,
                      generator)
from fastiml import ops, reference
from fastiml.losses import PivotConsistencyLoss

F64_RTOL = 1e-10
F32_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread(num_threads):
    """One intra-op thread by default (a parallel region around microseconds of work is slow on
    a loaded 2-core machine); ``test_threads_agree`` runs the parallel path."""
    num_threads(1)


# (B, H, W, p): whole cells, partial cells, p = 1, p larger than the map, one row.
SHAPES = [(2, 8, 8, 4), (2, 7, 9, 3), (1, 5, 6, 1), (2, 6, 5, 8), (3, 13, 11, 4), (1, 1, 17, 2)]


def grid(h, w, p):
    return -(-h // p), -(-w // p)


def make_problem(b, h, w, p, dtype=torch.float64, seed=0, scale=3.0, klass_values=(-1, 0, 1, 2),
                 device="cpu"):
    g = generator(seed)
    a = (torch.randn(b, 1, h, w, generator=g, dtype=torch.float64) * scale)
    bb = (torch.randn(b, 1, h, w, generator=g, dtype=torch.float64) * scale)
    values = torch.tensor(klass_values, dtype=torch.int8)
    klass = values[torch.randint(0, len(values), (b,) + grid(h, w, p), generator=g)]
    if 2 in klass_values and b * klass[0].numel() > 0:
        klass.view(-1)[0] = 2  # at least one contour cell
    return a.to(device, dtype), bb.to(device, dtype), klass.to(device)


def loss_and_grads(fn, a, b, klass, p, c=1.0, **kw):
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    loss = fn(a, b, klass, p, **kw)
    ga, gb = torch.autograd.grad(loss * c, (a, b))
    return loss.detach(), ga, gb


def closed_form(a, b, klass, p, weight_contour=1.0, weight_other=0.0):
    """A third way: per-pixel weights by explicit loops over cells, closed-form J."""
    w = torch.zeros_like(a)
    gh, gw = klass.shape[1:]
    for cy in range(gh):
        for cx in range(gw):
            k = klass[:, cy, cx]
            wk = torch.where(k == 2, torch.tensor(weight_contour, dtype=a.dtype),
                             torch.where(k == -1, torch.tensor(0.0, dtype=a.dtype),
                                         torch.tensor(weight_other, dtype=a.dtype)))
            w[:, 0, cy * p:(cy + 1) * p, cx * p:(cx + 1) * p] = wk[:, None, None]
    j = (torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)
    return (w * j).sum() / w.sum() if w.sum() > 0 else a.new_zeros(())


# ----------------------------------------------------------------------- against reference

# Weights exactly representable in float32: reference.pivot_consistency builds its weight map
# with torch.where on Python scalars, i.e. in float32, so 0.3 would be rounded there (3e-10
# relative) while the kernel keeps it in double. (1, 1): contour and other cells weigh the same
# (the CPU kernel merges them into one-weight blocks); (0, 0.5): contour cells weigh nothing.
@pytest.mark.parametrize("weights", [(1.0, 0.0), (1.0, 0.25), (0.375, 2.0), (1.0, 1.0), (0.0, 0.5)])
@pytest.mark.parametrize("b,h,w,p", SHAPES)
def test_matches_reference_float64(b, h, w, p, weights, device):
    wc, wo = weights
    a, bb, klass = make_problem(b, h, w, p, seed=h * w + p, device=device)
    c = 2.7183  # grad_output != 1
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, bb, klass, p, c,
                                  weight_contour=wc, weight_other=wo)
    rloss, rga, rgb = loss_and_grads(reference.pivot_consistency, a, bb, klass, p, c,
                                     weight_contour=wc, weight_other=wo)
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert ga.dtype == torch.float64 and ga.shape == a.shape
    assert_close_scaled(loss, rloss, F64_RTOL, "loss")
    assert_close_scaled(ga, rga, F64_RTOL, "grad_a")
    assert_close_scaled(gb, rgb, F64_RTOL, "grad_b")
    torch.testing.assert_close(loss, closed_form(a, bb, klass, p, wc, wo), rtol=1e-10,
                               atol=1e-12)
    assert loss > 0 or (wc == 0 and (klass == 2).all())  # every cell contour, weighing 0


def test_weights_kept_in_double():
    """Weights that float32 cannot hold (0.3, 0.1) are used at full precision for float64."""
    a, bb, klass = make_problem(2, 7, 9, 3, seed=15)
    loss = ops.pivot_consistency(a, bb, klass, 3, weight_contour=0.3, weight_other=0.1)
    torch.testing.assert_close(loss, closed_form(a, bb, klass, 3, 0.3, 0.1), rtol=1e-13, atol=0)


def test_reference_keeps_weights_in_double():
    a, bb, klass = make_problem(2, 7, 9, 3, seed=15)
    got = reference.pivot_consistency(a, bb, klass, 3, weight_contour=0.3, weight_other=0.1)
    torch.testing.assert_close(got, closed_form(a, bb, klass, 3, 0.3, 0.1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("b,h,w,p", SHAPES)
def test_matches_reference_float32(b, h, w, p, device):
    a, bb, klass = make_problem(b, h, w, p, seed=h + w * p, device=device)
    c = -0.37 * torch.rand(1, generator=generator(1)).item() - 0.5  # a random negative scalar
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a.float(), bb.float(), klass, p, c,
                                  weight_other=0.5)
    rloss, rga, rgb = loss_and_grads(reference.pivot_consistency, a.float().double(),
                                     bb.float().double(), klass, p, c, weight_other=0.5)
    assert loss.dtype == torch.float32 and ga.dtype == torch.float32 and gb.dtype == torch.float32
    assert_close_scaled(loss, rloss, F32_RTOL, "loss")
    assert_close_scaled(ga, rga, F32_RTOL, "grad_a")
    assert_close_scaled(gb, rgb, F32_RTOL, "grad_b")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("b,h,w,p", [(2, 5, 6, 2), (1, 4, 7, 3), (2, 3, 3, 1)])
def test_gradcheck(b, h, w, p, seed):
    a, bb, klass = make_problem(b, h, w, p, seed=seed)
    a.requires_grad_()
    bb.requires_grad_()
    fn = lambda x, y: ops.pivot_consistency(x, y, klass, p, weight_other=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, bb), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_reads_klass_by_cell():
    """Only the pixels of a contour cell count: logits that differ elsewhere change nothing."""
    p = 3
    a = torch.zeros(1, 1, 7, 8, dtype=torch.float64)
    b = torch.zeros_like(a)
    klass = torch.zeros(1, 3, 3, dtype=torch.int8)
    klass[0, 2, 1] = 2  # the cell of rows 6..6 (partial), columns 3..5
    b[0, 0, 6, 3:6] = torch.tensor([1.0, -2.0, 0.5])
    b[0, 0, :6] = 5.0  # every other row differs, but lies in non-contour cells
    loss = ops.pivot_consistency(a, b, klass, p)
    j = (torch.sigmoid(a[0, 0, 6, 3:6]) - torch.sigmoid(b[0, 0, 6, 3:6])) * (
        a[0, 0, 6, 3:6] - b[0, 0, 6, 3:6])
    torch.testing.assert_close(loss, j.mean(), rtol=1e-12, atol=0)
    klass[0, 2, 1] = 0
    klass[0, 0, 0] = 2  # now a cell where the branches differ by 5 everywhere
    expected = (0.5 - torch.sigmoid(torch.tensor(5.0, dtype=torch.float64))) * -5.0
    torch.testing.assert_close(ops.pivot_consistency(a, b, klass, p), expected)


# ---------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("magnitude", [1e4, 80.0, 30.0])
def test_large_logits_are_finite(magnitude, dtype):
    g = generator(5)
    signs = lambda: torch.where(torch.rand(2, 1, 9, 10, generator=g) < 0.5, -1.0, 1.0)  # noqa
    a = (signs() * magnitude).to(dtype)
    b = (signs() * magnitude).to(dtype)
    b[0, 0, 0, :3] = a[0, 0, 0, :3]  # some equal pairs
    klass = torch.full((2, 3, 4), 2, dtype=torch.int8)
    klass[1, 0, 0] = 0
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, b, klass, 3, 1.5, weight_other=0.5)
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    exact = reference.pivot_consistency(a.double(), b.double(), klass, 3, weight_other=0.5)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
    # J -> 2 * magnitude * P(signs differ); its gradient vanishes with the sigmoids' slope
    if magnitude >= 80:
        assert ga.abs().max() <= 1.5 and gb.abs().max() <= 1.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_logits_match_the_reference(dtype):
    """Logits near the half type's range (float32 accumulation): value and gradient equal the
    float64 reference's on the same (exactly representable) inputs."""
    big = 6e4 if dtype == torch.float16 else 1e30
    g = generator(6)
    signs = torch.where(torch.rand(2, 1, 4, 4, generator=g) < 0.5, -1.0, 1.0)
    a = (signs * big).to(dtype)
    b = torch.where(torch.rand(2, 1, 4, 4, generator=g) < 0.5, -a, a)  # agreeing and opposed
    b[1, 0, 0, 0] = 0.5  # one moderate logit: a non-vanishing gradient
    klass = torch.full((2, 2, 2), 2, dtype=torch.int8)
    klass[1, 1, 1] = 0
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, b, klass, 2, weight_other=0.5)
    assert loss.dtype == torch.float32 and ga.dtype == dtype
    exact, ea, eb = loss_and_grads(reference.pivot_consistency, a.double(), b.double(), klass, 2,
                                   weight_other=0.5)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(ga.double(), ea, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(gb.double(), eb, rtol=1e-2, atol=1e-6)
    assert eb.abs().max() > 1e-3  # the moderate logit's gradient is checked, not only zeros


@pytest.mark.parametrize("case", ["all_padding", "no_contour", "zero_weights"])
def test_zero_total_weight_gives_zero_loss_and_gradients(case):
    a, b, klass = make_problem(2, 6, 7, 2, seed=3)
    kw = {}
    if case == "all_padding":
        klass.fill_(-1)
        kw = dict(weight_contour=1.0, weight_other=1.0)
    elif case == "no_contour":
        klass = klass.clamp(max=1)
    else:
        kw = dict(weight_contour=0.0, weight_other=0.0)
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, b, klass, 2, 3.0, **kw)
    assert loss.item() == 0.0
    assert (ga == 0).all() and (gb == 0).all()
    assert reference.pivot_consistency(a, b, klass, 2, **kw).item() == 0.0


def test_padding_cells_weigh_zero_with_weight_other():
    a, b, klass = make_problem(2, 8, 8, 4, seed=8)
    a2 = a.clone()
    klass[0, 0, 0] = -1
    a2[0, 0, :4, :4] += 100.0  # change the logits of a padding cell only
    for fn in (ops.pivot_consistency, reference.pivot_consistency):
        l1 = fn(a, b, klass, 4, weight_other=0.7)
        l2 = fn(a2, b, klass, 4, weight_other=0.7)
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)


# The CPU kernel walks each pixel row in blocks of 16 pixels: blocks that weigh nothing are
# skipped, blocks of one weight (merged into runs) multiply by it, the others weigh per pixel.
# Contour cells (p = 4) in a 70-pixel row: cells 3-4 straddle the first block border (pixels
# 12-19), cell 13 lies inside block 3, cell 17 in the 6-pixel tail; cell 9 (pixels 36-39)
# shares block 2 with zero-weight pixels only. In the second image cells 4-7 fill block 1, next
# to block 0 of weight_other: two one-weight blocks of different weights side by side.
SPARSE_CELLS = (3, 4, 9, 13, 17)


def sparse_problem(dtype=torch.float64, seed=11):
    a, b, _ = make_problem(2, 10, 70, 4, dtype=dtype, seed=seed)
    klass = torch.zeros(2, 3, 18, dtype=torch.int8)
    klass[0, 0, list(SPARSE_CELLS)] = 2
    klass[1, 0, 4:8] = 2
    klass[1, 2, [0, 17]] = 2  # the last cell row is partial (rows 8-9)
    klass[1, 1, 5] = -1
    return a, b, klass


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_other", [0.0, 0.5])
def test_sparse_contour_cells_across_pixel_blocks(dtype, weight_other, level, at_level):
    """At every CPU level: each level skips empty groups of its own vector width."""
    at_level(level)
    a, b, klass = sparse_problem(dtype)
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, b, klass, 4, 2.0,
                                  weight_other=weight_other)
    exact, ea, eb = loss_and_grads(reference.pivot_consistency, a.double(), b.double(), klass, 4,
                                   2.0, weight_other=weight_other)
    rtol = F64_RTOL if dtype == torch.float64 else F32_RTOL
    torch.testing.assert_close(loss.double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(ga.double(), ea, rtol=rtol, atol=rtol * ea.abs().max().item())
    torch.testing.assert_close(gb.double(), eb, rtol=rtol, atol=rtol * eb.abs().max().item())
    if weight_other == 0.0:  # exact zeros wherever a pixel weighs nothing
        counted = klass.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None, :10, :70] == 2
        assert (ga[~counted] == 0).all() and (gb[~counted] == 0).all()
        assert (ga[counted] != 0).all()


@pytest.mark.parametrize("level", LEVELS)
def test_pixels_that_weigh_nothing_never_reach_the_sum(level, at_level):
    """Non-finite logits in zero-weight pixels -- here next to counted ones in the same pixel
    block -- change neither the loss nor the other gradients, and get a zero gradient."""
    at_level(level)
    a, b, klass = sparse_problem(torch.float32)
    clean = loss_and_grads(ops.pivot_consistency, a, b, klass, 4)
    a2, b2 = a.clone(), b.clone()
    a2[0, 0, 0, 20:24] = float("inf")  # cell 5: zero weight, in block 1 with cell 4's pixels
    b2[0, 0, 1, 34:36] = float("nan")  # cell 8, block 2 with cell 9's pixels
    dirty = loss_and_grads(ops.pivot_consistency, a2, b2, klass, 4)
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[1], dirty[1]) and torch.equal(clean[2], dirty[2])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("p", [1, 3, 5, 7, 16, 20])
def test_cells_of_every_width_across_pixel_blocks(p, level, at_level):
    """The kernel walks the cells under each 16-pixel block along the row: cells that straddle
    block borders at every offset (p = 3, 5, 7, 20), one cell per pixel (p = 1), a cell per
    block (p = 16), and an 83-pixel row ending in a partial block and a partial cell."""
    at_level(level)
    a, b, klass = make_problem(2, 9, 83, p, dtype=torch.float32, seed=p,
                               klass_values=(-1, 0, 2, 2))
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, b, klass, p, 2.0, weight_other=0.25)
    exact, ea, eb = loss_and_grads(closed_form, a.double(), b.double(), klass, p, 2.0,
                                   weight_other=0.25)
    torch.testing.assert_close(loss.double(), exact, rtol=F32_RTOL, atol=0)
    assert_close_scaled(ga, ea, F32_RTOL, "grad_a")
    assert_close_scaled(gb, eb, F32_RTOL, "grad_b")


@pytest.mark.parametrize("level", LEVELS)
def test_nan_in_a_counted_pixel_is_not_hidden(level, at_level):
    """A NaN logit where the weight is not 0 makes the loss NaN and that pixel's gradients NaN
    (the sigmoid alone would map it to a finite value: J's (a - b) factor must carry it)."""
    at_level(level)
    a, b, klass = sparse_problem(torch.float32)
    for which in (0, 1):  # the NaN in logit_a, then in logit_b
        logits = [a.clone(), b.clone()]
        logits[which][0, 0, 0, 13] = float("nan")  # cell 3: contour
        loss, ga, gb = loss_and_grads(ops.pivot_consistency, *logits, klass, 4)
        assert torch.isnan(loss)
        assert torch.isnan(ga[0, 0, 0, 13]) and torch.isnan(gb[0, 0, 0, 13])
        assert torch.isfinite(ga[0, 0, 0, 12]) and torch.isfinite(gb[0, 0, 0, 12])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,w,p", [(2, 8, 8, 4), (2, 7, 9, 3), (1, 5, 6, 1)])
def test_half_logits(dtype, b, h, w, p):
    a, bb, klass = make_problem(b, h, w, p, seed=p + 20)
    a, bb = a.to(dtype), bb.to(dtype)
    c = 1.7
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, bb, klass, p, c, weight_other=0.5)
    assert loss.dtype == torch.float32
    assert ga.dtype == dtype and gb.dtype == dtype
    exact = loss_and_grads(reference.pivot_consistency, a.double(), bb.double(), klass, p, c,
                           weight_other=0.5)
    # The low-precision rule (conftest), every result relative: J = (sigmoid(a) - sigmoid(b)) *
    # (a - b) >= 0 and each pixel's gradient is a sum of two terms of one sign, so nothing
    # cancels. The exponentials' arguments are the logits themselves, exact in float32: float32
    # adds only the loss's sum over the pixels.
    arg_error = float32_arg_error(0.0, a.numel())
    for name, got, ex, result_dtype in zip(("loss", "grad_a", "grad_b"), (loss, ga, gb), exact,
                                           (torch.float32, dtype, dtype)):
        assert_close_half_rule(got, ex, result_dtype, name, arg_error=arg_error)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_klass"])
def test_non_contiguous_inputs(layout, device):
    a, b, klass = make_problem(2, 9, 9, 3, seed=4, device=device)
    if layout == "transposed":
        xa, xb = a.transpose(2, 3).contiguous().transpose(2, 3), b.transpose(2, 3)
        ka = klass
        ref_a, ref_b = a, b.transpose(2, 3).contiguous()
    elif layout == "strided":
        big_a = torch.randn(2, 1, 18, 9, dtype=a.dtype, device=device)
        big_a[:, :, ::2] = a
        xa, xb, ka = big_a[:, :, ::2], b, klass
        ref_a, ref_b = a, b
    else:
        ka = klass[:1].expand(2, -1, -1)
        xa, xb = a, b
        ref_a, ref_b = a, b
        klass = ka.contiguous()
    assert not (xa.is_contiguous() and xb.is_contiguous() and ka.is_contiguous())
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, xa, xb, ka, 3, 0.5, weight_other=0.25)
    rloss, rga, rgb = loss_and_grads(reference.pivot_consistency, ref_a, ref_b, klass, 3, 0.5,
                                     weight_other=0.25)
    assert_close_scaled(loss, rloss, F64_RTOL, "loss")
    assert_close_scaled(ga, rga, F64_RTOL, "grad_a")
    assert_close_scaled(gb, rgb, F64_RTOL, "grad_b")


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_agree(threads, num_threads):
    """A map big enough for several parallel tasks; bitwise equal for a thread count."""
    num_threads(threads)
    a, b, klass = make_problem(2, 64, 48, 4, dtype=torch.float32, seed=6)
    loss, ga, gb = loss_and_grads(ops.pivot_consistency, a, b, klass, 4, 1.3, weight_other=0.1)
    again = loss_and_grads(ops.pivot_consistency, a, b, klass, 4, 1.3, weight_other=0.1)
    assert all(torch.equal(x, y) for x, y in zip((loss, ga, gb), again))
    rloss, rga, rgb = loss_and_grads(reference.pivot_consistency, a.double(), b.double(), klass,
                                     4, 1.3, weight_other=0.1)
    assert_close_scaled(loss, rloss, F32_RTOL, "loss")
    assert_close_scaled(ga, rga, F32_RTOL, "grad_a")


def test_empty_batch():
    a = torch.zeros(0, 1, 5, 5, requires_grad=True)
    b = torch.zeros(0, 1, 5, 5, requires_grad=True)
    loss = ops.pivot_consistency(a, b, torch.zeros(0, 2, 2, dtype=torch.int8), 3)
    assert loss.item() == 0.0
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert ga.shape == a.shape and gb.shape == b.shape


def test_gradient_of_one_input_only():
    a, b, klass = make_problem(2, 6, 6, 2, seed=9)
    a.requires_grad_()
    loss = ops.pivot_consistency(a, b, klass, 2)
    (ga,) = torch.autograd.grad(loss, (a,))
    a_ref = a.detach().requires_grad_()
    (rga,) = torch.autograd.grad(reference.pivot_consistency(a_ref, b, klass, 2), (a_ref,))
    assert_close_scaled(ga, rga, F64_RTOL, "grad_a")


def test_module_mines_klass_from_the_mask():
    g = generator(12)
    mask = torch.zeros(2, 16, 12, dtype=torch.bool)
    mask[0, 3:11, 2:9] = True
    mask[1, :, 6:] = True
    mask[1, 5, 1] = True
    valid = torch.ones_like(mask)
    valid[:, 12:] = False
    a = torch.randn(2, 1, 16, 12, generator=g, dtype=torch.float64)
    b = torch.randn(2, 1, 16, 12, generator=g, dtype=torch.float64)
    module = PivotConsistencyLoss(patch=4, weight_contour=1.0, weight_other=0.25)
    _, klass = reference.contour_mine(mask, 4, valid=valid)
    expected = reference.pivot_consistency(a, b, klass, 4, weight_other=0.25)
    torch.testing.assert_close(module(a, b, mask, valid), expected, rtol=1e-10, atol=0)
    assert (klass[:, 3] == -1).all() and (klass == 2).any()


# ------------------------------------------------------------------- opcheck, compile, amp

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(dtype, requires_grad):
    a, b, klass = make_problem(2, 7, 9, 3, dtype=dtype, seed=10)
    a.requires_grad_(requires_grad)
    b.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastiml.pivot_consistency.default,
                          (a, b, klass, 3, 1.0, 0.25))


def test_opcheck_backward_op():
    a, b, klass = make_problem(2, 7, 9, 3, seed=11)
    grad = torch.tensor(1.3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastiml.pivot_consistency_backward.default,
                          (grad, a, b, klass, 3, 1.0, 0.25))


def test_torch_compile_fullgraph():
    mask = torch.zeros(2, 12, 8, dtype=torch.bool)
    mask[0, 2:7, 3:8] = True
    a, b, _ = make_problem(2, 12, 8, 4, dtype=torch.float32, seed=13)

    def fn(x, y, m):
        _, klass = ops.contour_mine(m, 4)
        return ops.pivot_consistency(x, y, klass, 4, weight_other=0.1) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = compiled(xa, xb, mask)
    out.backward()
    ya, yb = a.clone().requires_grad_(), b.clone().requires_grad_()
    expected = fn(ya, yb, mask)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xa.grad, ya.grad)
    torch.testing.assert_close(xb.grad, yb.grad)


def test_autocast_runs_on_what_it_receives():
    a, b, klass = make_problem(2, 8, 8, 4, dtype=torch.float32, seed=14)
    plain = ops.pivot_consistency(a, b, klass, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = ops.pivot_consistency(a, b, klass, 4)
        amp_half = ops.pivot_consistency(a.bfloat16(), b.bfloat16(), klass, 4)
    assert amp.dtype == torch.float32 and amp_half.dtype == torch.float32
    assert torch.equal(amp, plain)


# ----------------------------------------------------------------------------- bad inputs

A = torch.zeros(2, 1, 8, 8)
K = torch.zeros(2, 2, 2, dtype=torch.int8)

BAD = [
    (dict(logit_a=torch.zeros(2, 8, 8)), ValueError, "logit_a"),
    (dict(logit_a=torch.zeros(2, 2, 8, 8)), ValueError, "logit_a"),
    (dict(logit_b=torch.zeros(2, 1, 8)), ValueError, "logit_b"),
    (dict(logit_a=torch.zeros(2, 1, 8, 8, dtype=torch.int32)), TypeError, "logit_a"),
    (dict(logit_a=A.numpy()), TypeError, "logit_a"),
    (dict(logit_b=torch.zeros(2, 1, 8, 9)), ValueError, "logit_b"),
    (dict(logit_b=torch.zeros(1, 1, 8, 8)), ValueError, "logit_b"),
    (dict(logit_b=torch.zeros(2, 1, 8, 8, dtype=torch.float64)), ValueError, "logit_b"),
    (dict(klass=torch.zeros(2, 2, 3, dtype=torch.int8)), ValueError, "klass"),
    (dict(klass=torch.zeros(1, 2, 2, dtype=torch.int8)), ValueError, "klass"),
    (dict(klass=torch.zeros(2, 8, 8, dtype=torch.int8)), ValueError, "klass"),
    (dict(klass=torch.zeros(2, 1, 2, 2, dtype=torch.int8)), ValueError, "klass"),
    (dict(klass=torch.zeros(2, 2, 2, dtype=torch.int64)), TypeError, "klass"),
    (dict(klass=torch.zeros(2, 2, 2, dtype=torch.uint8)), TypeError, "klass"),
    (dict(klass=torch.zeros(2, 2, 2)), TypeError, "klass"),
    (dict(patch=0), ValueError, "patch"),
    (dict(patch=-4), ValueError, "patch"),
    (dict(patch=4.0), ValueError, "patch"),
    (dict(patch=3), ValueError, "klass"),  # klass grid no longer matches ceil(8/3) = 3
    (dict(weight_contour=-1.0), ValueError, "weight"),
    (dict(weight_other=-0.5), ValueError, "weight"),
    (dict(weight_contour=float("nan")), ValueError, "weight_contour"),
    (dict(weight_contour=float("inf")), ValueError, "weight_contour"),
    (dict(weight_other=float("nan")), ValueError, "weight_other"),
    (dict(weight_other=True), ValueError, "weight_other"),
    (dict(weight_contour=torch.tensor(1.0)), ValueError, "weight_contour"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    args = dict(logit_a=A, logit_b=A, klass=K, patch=4)
    args.update(kwargs)
    pos = [args.pop(k) for k in ("logit_a", "logit_b", "klass", "patch")]
    with pytest.raises(error, match=match):
        ops.pivot_consistency(*pos, **args)


def test_raw_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="logit_a"):
        torch.ops.fastiml.pivot_consistency(torch.zeros(2, 8, 8), A, K, 4, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="logit_b"):
        torch.ops.fastiml.pivot_consistency(A, A.double(), K, 4, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="klass"):
        torch.ops.fastiml.pivot_consistency(A, A, K.long(), 4, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="patch"):
        torch.ops.fastiml.pivot_consistency(A, A, K, 0, 1.0, 0.0)
