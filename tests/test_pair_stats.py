"""fastiml.ops.pair_stats against the materialised float64 reference (DESIGN 2.1, STYLE rule 11).

The CPU kernel has two forward paths and two schedules, and every comparison here names which
one it drives:

* a fixed log-sum-exp shift when ``2 * max|q| * max|k| / tau <= 80`` (``unit``: L2-normalised
  rows, tau 0.1), an online running max otherwise (``x10``: unnormalised rows of norm ~10);
* a symmetric schedule over the upper tiles in self mode (``k=None``, fixed shift only) and a
  general one; tiles are 256 rows/columns, so the ``tiles`` problems (600 x 517, 520, 600)
  span three tiles with odd remainders.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import (assert_close_half_rule, assert_close_scaled, float32_arg_error, generator,
                      similarity_span)
from fastiml import ops, reference

TILE = 256
FIXED_SHIFT_SPAN = 80.0  # kMaxFixedShiftSpan in csrc/ops/pair_stats.h
F64_RTOL = 1e-9


# ------------------------------------------------------------------------------- problems

@dataclass
class Problem:
    q: Tensor
    k: Optional[Tensor]  # None: self mode
    q_label: Tensor
    k_label: Optional[Tensor]
    q_group: Optional[Tensor] = None
    k_group: Optional[Tensor] = None
    kwargs: dict = field(default_factory=dict)

    @property
    def self_mode(self) -> bool:
        return self.k is None

    def to(self, device=None, dtype=None) -> "Problem":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        feat = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, q=feat(self.q), k=feat(self.k), q_label=mv(self.q_label),
                       k_label=mv(self.k_label), q_group=mv(self.q_group),
                       k_group=mv(self.k_group))

    def call(self, fn, q, k, **overrides):
        return fn(q, k, self.q_label, self.k_label, self.q_group, self.k_group,
                  **{**self.kwargs, **overrides})


def features(n, d, scale, g):
    """``unit``: L2-normalised rows; ``x10``: unnormalised rows of norm ~10 (varying)."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if scale == "unit":
        return F.normalize(x, dim=1)
    if scale == "x10":
        return x * (10.0 / math.sqrt(d))
    raise AssertionError(scale)


def labels(n, classes, g, ignore_frac=0.0, ignore_index=-1):
    lab = torch.randint(0, classes, (n,), generator=g)
    if ignore_frac:
        lab[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return lab


def uses_fixed_shift(q, k, tau):
    """Mirrors the kernel's choice of path (max row norms are inflated by 1% there)."""
    if q.shape[0] == 0 or (k is not None and k.shape[0] == 0):
        return True
    nq = q.double().norm(dim=1).max().item() * 1.01
    nk = nq if k is None else k.double().norm(dim=1).max().item() * 1.01
    return 2 * nq * nk / tau <= FIXED_SHIFT_SPAN


def _general(n, m, d, ql, kl, qg=None, kg=None, **kw):
    return dict(n=n, m=m, d=d, q_label=ql, k_label=kl, q_group=qg, k_group=kg, kwargs=kw)


def _self(n, d, ql, qg=None, **kw):
    return dict(n=n, m=None, d=d, q_label=ql, k_label=None, q_group=qg, k_group=None,
                kwargs=kw)


def _groups_with_singletons(n, m, g):
    """Groups 0..2 on both sides, plus: row 0 and column 0 alone in group 9 (a group with one
    member on each side), row 1 alone in group 11 with no column (an empty denominator)."""
    qg, kg = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    qg[0], kg[0], qg[1] = 9, 9, 11
    return qg, kg


def _big_labels(n, g):
    """Labels far outside int32, negative ones included (the kernel compacts them)."""
    return torch.tensor([-(2 ** 62), 2 ** 40, 7, -3])[torch.randint(0, 4, (n,), generator=g)]


def _scenario(name, g):
    if name == "n_ne_m":
        return _general(37, 53, 16, labels(37, 4, g), labels(53, 4, g))
    if name == "tiles":
        return _general(600, 517, 33, labels(600, 5, g, 0.05), labels(517, 5, g, 0.05))
    if name == "tiles_small":  # two tiles each way, odd remainders
        return _general(300, 270, 17, labels(300, 4, g, 0.05), labels(270, 4, g, 0.05))
    if name == "n1":
        return _general(1, 20, 3, labels(1, 3, g), labels(20, 3, g))
    if name == "m1":
        return _general(20, 1, 3, labels(20, 2, g), labels(1, 2, g))
    if name == "one_label":
        return _general(30, 40, 8, torch.zeros(30, dtype=torch.long),
                        torch.zeros(40, dtype=torch.long))
    if name == "rows_without_positive":  # q labels 3..5 never occur in k
        return _general(40, 30, 8, labels(40, 6, g), labels(30, 3, g))
    if name == "every_row_ignored":
        return _general(12, 15, 4, torch.full((12,), -1), labels(15, 3, g))
    if name == "some_columns_ignored":
        return _general(25, 300, 5, labels(25, 3, g), labels(300, 3, g, 0.3))
    if name == "groups":
        qg, kg = _groups_with_singletons(30, 25, g)
        return _general(30, 25, 6, labels(30, 3, g), labels(25, 3, g), qg, kg)
    if name == "groups_tiles":
        qg, kg = _groups_with_singletons(300, 270, g)
        return _general(300, 270, 7, labels(300, 4, g, 0.1), labels(270, 4, g, 0.1), qg, kg)
    if name == "custom_ignore_index":  # -1 is a real label here, 3 is ignored
        return _general(30, 28, 5, labels(30, 5, g) - 1, labels(28, 5, g) - 1, ignore_index=3)
    if name == "big_label_values":
        big = torch.tensor([2 ** 50, -5])
        qg = big[torch.randint(0, 2, (33,), generator=g)]
        kg = big[torch.randint(0, 2, (29,), generator=g)]
        return _general(33, 29, 4, _big_labels(33, g), _big_labels(29, g), qg, kg)
    if name == "tiles_one_group":  # image-major groups: whole tiles in one group, none ignored
        return _general(600, 530, 17, labels(600, 4, g), labels(530, 4, g),
                        torch.arange(600) // 300, torch.arange(530) // 265)
    if name == "square_exclude_self":  # general mode (k a different tensor) with exclude_self
        return _general(31, 31, 9, labels(31, 3, g), labels(31, 3, g), exclude_self=True)
    if name == "self":
        return _self(23, 5, labels(23, 3, g))
    if name == "self_tiles":
        return _self(600, 33, labels(600, 6, g, 0.05))
    if name == "self_tiles_small":
        return _self(300, 17, labels(300, 4, g, 0.05))
    if name == "self_n1":
        return _self(1, 3, labels(1, 2, g))
    if name == "self_n2":
        return _self(2, 3, torch.tensor([4, 4]))
    if name == "self_one_label":
        return _self(17, 4, torch.zeros(17, dtype=torch.long))
    if name == "self_singleton_label":  # label 9 has one member: no positive with exclude_self
        lab = labels(26, 3, g)
        lab[5] = 9
        return _self(26, 6, lab)
    if name == "self_every_row_ignored":
        return _self(10, 4, torch.full((10,), -1))
    if name == "self_groups":
        qg = torch.randint(0, 3, (40,), generator=g)
        qg[3] = 8  # a group with one member
        return _self(40, 6, labels(40, 3, g, 0.1), qg)
    if name == "self_groups_tiles":
        qg = torch.randint(0, 4, (300,), generator=g)
        qg[280] = 8
        return _self(300, 12, labels(300, 3, g, 0.1), qg)
    if name == "self_tiles_one_group":  # tiles 0 and 2 in one group each, tile 1 straddles two
        return _self(600, 20, labels(600, 4, g), torch.arange(600) // 300)
    if name == "self_big_label_values":
        return _self(31, 4, _big_labels(31, g), torch.tensor([2 ** 50, -5])[
            torch.randint(0, 2, (31,), generator=g)])
    raise AssertionError(name)


GENERAL = ["n_ne_m", "tiles", "n1", "m1", "one_label", "rows_without_positive",
           "every_row_ignored", "some_columns_ignored", "groups", "groups_tiles",
           "custom_ignore_index", "big_label_values", "square_exclude_self", "tiles_one_group"]
SELF = ["self", "self_tiles", "self_n1", "self_n2", "self_one_label", "self_singleton_label",
        "self_every_row_ignored", "self_groups", "self_groups_tiles", "self_big_label_values",
        "self_tiles_one_group"]
SCALES = {"unit": 0.1, "x10": 0.1}  # scale -> tau


def make_problem(name, scale="unit", dtype=torch.float64, device="cpu", seed=0, **kwargs):
    g = generator(seed)
    s = _scenario(name, g)
    q = features(s["n"], s["d"], scale, g)
    k = None if s["m"] is None else features(s["m"], s["d"], scale, g)
    p = Problem(q, k, s["q_label"], s["k_label"], s["q_group"], s["k_group"],
                {"tau": SCALES[scale], **s["kwargs"], **kwargs})
    return p.to(device, dtype)


# ----------------------------------------------------------------------------- evaluation

def weights(n, dtype, seed=1):
    """Random upstream gradients for lse and pos_mean (grad_output != 1)."""
    g = generator(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(n, generator=g, dtype=torch.float64).to(dtype))


def evaluate(fn, p: Problem, q=None, k=None, w=None, **overrides):
    """Runs ``fn`` (ops or reference) on copies of the features; returns the three statistics
    and the gradients of ``sum(w1 * finite(lse)) + sum(w2 * pos_mean)`` wrt q (and k)."""
    q = (p.q if q is None else q).detach().clone().requires_grad_(True)
    k_src = p.k if k is None else k
    k = None if k_src is None else k_src.detach().clone().requires_grad_(True)
    lse, pos_mean, pos_count = p.call(fn, q, k, **overrides)
    w1, w2 = w if w is not None else weights(p.q.shape[0], torch.float64)
    w1, w2 = w1.to(lse.device, torch.float64), w2.to(lse.device, torch.float64)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    # The loss is summed in float64 whatever the statistics' dtype, so that every
    # implementation receives exactly the same upstream gradients w1, w2.
    loss = (w1 * finite.double()).sum() + (w2 * pos_mean.double()).sum()
    inputs = [q] if k is None else [q, k]
    grads = torch.autograd.grad(loss, inputs)
    return lse.detach(), pos_mean.detach(), pos_count, grads


def assert_matches(actual, expected, rtol, name=""):
    lse, pos_mean, pos_count, grads = actual
    r_lse, r_pos_mean, r_pos_count, r_grads = expected
    assert pos_count.dtype == torch.long
    assert torch.equal(pos_count.cpu(), r_pos_count.cpu()), f"{name}: pos_count differs"
    assert_close_scaled(lse, r_lse, rtol, f"{name} lse")
    assert_close_scaled(pos_mean, r_pos_mean, rtol, f"{name} pos_mean")
    assert len(grads) == len(r_grads)
    for which, g, r in zip("qk", grads, r_grads):
        assert torch.isfinite(g).all(), f"{name}: non-finite grad of {which}"
        assert_close_scaled(g, r, rtol, f"{name} grad {which}")


def check_against_reference(p: Problem, rtol=F64_RTOL, name=""):
    expected = evaluate(reference.pair_stats, p.to(dtype=torch.float64))
    actual = evaluate(ops.pair_stats, p)
    assert_matches(actual, expected, rtol, name)
    return actual


def low_precision_arg_error(p: Problem) -> float:
    """float32's error in the similarities of ``p`` (conftest.float32_arg_error)."""
    columns = p.q.shape[0] if p.k is None else p.k.shape[0]
    return float32_arg_error(similarity_span(p.q, p.k, p.kwargs["tau"]), columns)


def check_low_precision(p: Problem, dtype):
    """The low-precision rule (conftest.assert_close_half_rule) for every output and gradient
    against float64 from the same input values: float32 statistics (log-domain, float32's
    epsilon), gradients in ``dtype`` (relative, ``dtype``'s epsilon), exact pos_count and -inf
    pattern. Returns the margins (error / bound) of lse, pos_mean and the gradients."""
    # Upstream gradients exactly representable in dtype, so both runs see the same ones.
    w = tuple(t.to(dtype).double() for t in weights(p.q.shape[0], torch.float64))
    lse, pos_mean, pos_count, grads = evaluate(ops.pair_stats, p, w=w)
    assert lse.dtype == pos_mean.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads)
    exact = evaluate(reference.pair_stats, p.to(dtype=torch.float64), w=w)
    assert torch.equal(pos_count.cpu(), exact[2].cpu())
    arg_error = low_precision_arg_error(p)
    margins = [assert_close_half_rule(stat, e, torch.float32, name, arg_error=arg_error,
                                      log_domain=True)
               for name, stat, e in (("lse", lse, exact[0]), ("pos_mean", pos_mean, exact[1]))]
    for which, g, e in zip("qk", grads, exact[3]):
        margins.append(assert_close_half_rule(g, e, dtype, f"grad {which}",
                                              arg_error=arg_error))
    return margins


# -------------------------------------------------------------- float64 against the reference

@pytest.mark.parametrize("scale", ["unit", "x10"])
@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize("name", GENERAL)
def test_general_matches_reference(name, denominator, scale, device):
    p = make_problem(name, scale, device=device, denominator=denominator)
    assert uses_fixed_shift(p.q, p.k, p.kwargs["tau"]) == (scale == "unit")
    check_against_reference(p, name=name)


@pytest.mark.parametrize("scale", ["unit", "x10"])
@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("name", SELF)
def test_self_matches_reference(name, exclude_self, denominator, scale, device):
    p = make_problem(name, scale, device=device, denominator=denominator,
                     exclude_self=exclude_self)
    assert uses_fixed_shift(p.q, None, p.kwargs["tau"]) == (scale == "unit")
    check_against_reference(p, name=name)


def test_expected_statistics_by_hand():
    """Pins the definition on a 3 x 3 case, independently of the reference."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    lab = torch.tensor([0, 0, 1])
    lse, pos_mean, pos_count = ops.pair_stats(q, None, lab, None, tau=0.5, exclude_self=True)
    # s = q q^T / 0.5 = [[2, 0, 2], [0, 2, 2], [2, 2, 4]]
    torch.testing.assert_close(lse, torch.tensor([math.log(1 + math.e ** 2)] * 2
                                                 + [math.log(2 * math.e ** 2)],
                                                 dtype=torch.float64))
    torch.testing.assert_close(pos_mean, torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
    assert pos_count.tolist() == [1, 1, 0]
    lse, _, pos_count = ops.pair_stats(q, None, lab, None, tau=0.5, exclude_self=True,
                                       denominator="negatives")
    torch.testing.assert_close(lse, torch.tensor([2.0, 2.0, math.log(2 * math.e ** 2)],
                                                 dtype=torch.float64))
    lse, pos_mean, pos_count = ops.pair_stats(q, None, lab, None, tau=0.5)
    assert pos_count.tolist() == [2, 2, 1]
    torch.testing.assert_close(pos_mean, torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64))


def test_empty_denominators_give_neg_inf():
    """-inf exactly where the denominator set is empty, and nowhere else."""
    p = make_problem("groups", denominator="negatives")
    lse, _, _ = ops.pair_stats(p.q, p.k, p.q_label, p.k_label, p.q_group, p.k_group,
                               **p.kwargs)
    counted, positive = reference.pair_masks(p.q_label, p.k_label, p.q_group, p.k_group,
                                             False, -1)
    empty = ~(counted & ~positive).any(1)
    assert empty[1]  # row 1 is alone in its group
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.isfinite(lse[~empty]).all()


def _float32_params():
    for name, denominator in (("tiles", "all"), ("self_tiles", "all"),
                              ("groups_tiles", "negatives"), ("self_groups_tiles", "negatives")):
        for scale in ("unit", "x10"):
            yield pytest.param(name, scale, denominator, id=f"{name}-{scale}-{denominator}")


@pytest.mark.parametrize("name,scale,denominator", list(_float32_params()))
def test_float32_paths_and_tiles(name, scale, denominator):
    """float32 kernel on both forward paths and both schedules: float32 outputs, errors against
    float64 within the low-precision rule at float32's epsilon (conftest)."""
    extra = {"exclude_self": True} if name.startswith("self") else {}
    p = make_problem(name, scale, dtype=torch.float32, denominator=denominator, **extra)
    check_low_precision(p, torch.float32)



@pytest.mark.parametrize("threads", [1, 2])
def test_self_mode_online_backward_float32(threads, num_threads):
    """Minimal case: 264 rows (tiles of 256 + 8), D=8, |x| ~ 10, tau 0.1, float32. The
    self-mode gradient must be as accurate as the same problem in general mode (k a copy of q,
    grad = grad_q + grad_k): both within the low-precision rule at float32's epsilon."""
    num_threads(threads)
    g = generator(0)
    n, d = 264, 8
    x = torch.randn(n, d, generator=g) * (10 / math.sqrt(d))
    lab = torch.randint(0, 3, (n,), generator=g)
    assert not uses_fixed_shift(x, None, 0.1)
    p = Problem(x, None, lab, None, kwargs={"tau": 0.1, "exclude_self": True})
    w = weights(n, torch.float64)
    exact = evaluate(reference.pair_stats, p.to(dtype=torch.float64), w=w)[3][0]
    self_mode = evaluate(ops.pair_stats, p, w=w)[3][0]
    general = sum(evaluate(ops.pair_stats, replace(p, k=x.clone(), k_label=lab.clone()),
                           w=w)[3])
    arg_error = low_precision_arg_error(p)
    assert_close_half_rule(general, exact, torch.float32, "general mode", arg_error=arg_error)
    assert_close_half_rule(self_mode, exact, torch.float32, "self mode", arg_error=arg_error)


@pytest.mark.parametrize("side", ["fixed", "online"])
def test_fixed_shift_threshold_with_far_negatives(side):
    """Every similarity at -1/tau with tau at the edge of the fixed-shift range: exp(s - shift)
    is ~exp(-80), which must not underflow the float32 sums (nor lose the -inf pattern)."""
    g = generator(3)
    q = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    tau_edge = 2 * 1.01 ** 2 / FIXED_SHIFT_SPAN  # 2 * bound == 80 exactly
    tau = tau_edge * (1.001 if side == "fixed" else 0.999)
    assert uses_fixed_shift(q, -q, tau) == (side == "fixed")
    lab = torch.randint(0, 3, (300,), generator=g)
    p = Problem(q, -q, lab, lab.clone(), kwargs={"tau": tau})
    expected = evaluate(reference.pair_stats, p.to(dtype=torch.float64))
    actual = evaluate(ops.pair_stats, p)
    assert_matches(actual, expected, 1e-5, side)


@pytest.mark.parametrize("grad_scale", [1.0, 1e7])
def test_self_backward_shared_exponential_and_its_fallback(grad_scale):
    """Self mode at the edge of the fixed-shift range, each row's denominator all antipodal
    (s = -1/tau, lse ~ -bound): the CPU backward's shared exponential puts dL/dlse_i *
    exp(shift - lse_i) ~ |w| e^74 ~ |w| 1.7e32 in float32. With upstream gradients ~1 that
    fits; x1e7 it would overflow (float32 ends at 3.4e38), so the kernel must fall back to two
    exponentials per pair. Both are held to the low-precision rule at float32's epsilon."""
    g = generator(5)
    n = 300
    u = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    q = F.normalize(side * u + 1e-3 * torch.randn(n, 16, generator=g), dim=1)
    tau = 2 * 1.01 ** 2 / FIXED_SHIFT_SPAN * 1.001
    assert uses_fixed_shift(q, None, tau)
    lab = (side[:, 0] > 0).long()  # negatives_only: the denominator is the other side
    p = Problem(q, None, lab, None,
                kwargs={"tau": tau, "exclude_self": True, "denominator": "negatives"})
    w = tuple(t * grad_scale for t in weights(n, torch.float64))
    actual = evaluate(ops.pair_stats, p, w=w)
    exact = evaluate(reference.pair_stats, p.to(dtype=torch.float64), w=w)
    assert torch.isfinite(actual[3][0]).all()
    assert_close_half_rule(actual[3][0], exact[3][0], torch.float32,
                           f"grad q, upstream x{grad_scale:g}",
                           arg_error=low_precision_arg_error(p))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("self_mode", [False, True])
def test_large_similarities_stay_finite(self_mode, dtype):
    """Unnormalised rows x30 with tau 0.05 (|s| up to ~1e5): no NaN/inf anywhere; float64 is
    held to the reference, float32 to the low-precision rule at float32's epsilon."""
    g = generator(4)
    q = torch.randn(300, 8, generator=g, dtype=torch.float64) * 30
    k = None if self_mode else torch.randn(270, 8, generator=g, dtype=torch.float64) * 30
    ql = torch.randint(0, 3, (300,), generator=g)
    kl = None if self_mode else torch.randint(0, 3, (270,), generator=g)
    p = Problem(q, k, ql, kl, kwargs={"tau": 0.05, "exclude_self": self_mode}).to(dtype=dtype)
    actual = evaluate(ops.pair_stats, p)
    for t in (actual[0], actual[1], *actual[3]):
        assert not torch.isnan(t).any() and not torch.isposinf(t).any()
    for g_ in actual[3]:
        assert torch.isfinite(g_).all()
    if dtype == torch.float64:
        assert_matches(actual, evaluate(reference.pair_stats, p), F64_RTOL)
    else:
        check_low_precision(p, dtype)


def test_upstream_gradient_at_empty_rows_is_ignored():
    """A nonzero gradient reaching a -inf lse (empty denominator) contributes nothing, and
    each output can be used alone (the other's gradient is None)."""
    p = make_problem("groups", denominator="negatives")
    q, k = p.q.clone().requires_grad_(), p.k.clone().requires_grad_()
    lse, pos_mean, _ = p.call(ops.pair_stats, q, k)
    assert torch.isneginf(lse).any()
    w1, w2 = weights(q.shape[0], torch.float64)
    gq, gk = torch.autograd.grad((lse, pos_mean), (q, k), (w1, w2), retain_graph=True)
    w1_finite = torch.where(torch.isfinite(lse), w1, 0.0)
    rq, rk = torch.autograd.grad((lse, pos_mean), (q, k), (w1_finite, w2), retain_graph=True)
    torch.testing.assert_close(gq, rq, rtol=0, atol=0)
    torch.testing.assert_close(gk, rk, rtol=0, atol=0)
    # Through one output only.
    qr, kr = p.q.clone().requires_grad_(), p.k.clone().requires_grad_()
    r_lse, r_pos_mean, _ = p.call(reference.pair_stats, qr, kr)
    for out, r_out, w in ((lse, r_lse, w1_finite), (pos_mean, r_pos_mean, w2)):
        got = torch.autograd.grad(out, (q, k), w, retain_graph=True)
        want = torch.autograd.grad(r_out, (qr, kr), w, retain_graph=True)
        for a, b in zip(got, want):
            assert_close_scaled(a, b, F64_RTOL)


@pytest.mark.parametrize("needs", ["q", "k"])
def test_gradient_of_one_input_only(needs):
    p = make_problem("tiles", "unit")
    q = p.q.clone().requires_grad_(needs == "q")
    k = p.k.clone().requires_grad_(needs == "k")
    lse, pos_mean, _ = p.call(ops.pair_stats, q, k)
    w1, w2 = weights(q.shape[0], torch.float64)
    loss = (w1 * torch.where(torch.isfinite(lse), lse, 0.0)).sum() + (w2 * pos_mean).sum()
    (got,) = torch.autograd.grad(loss, [q if needs == "q" else k])
    _, _, _, (rq, rk) = evaluate(reference.pair_stats, p)
    assert_close_scaled(got, rq if needs == "q" else rk, F64_RTOL)


# ------------------------------------------------------------------------------ self mode

@pytest.mark.parametrize("scale", ["unit", "x10"])
@pytest.mark.parametrize("name", ["self_tiles", "self_groups"])
def test_self_mode_spellings_agree(name, scale):
    """k=None and k=q (with k_label=q_label, k_group=q_group) are the same self-contrast call:
    bitwise-identical statistics and one gradient. A *copy* of q as k (general mode) gives the
    same numbers up to rounding, and its two gradients add up to the self-mode one."""
    p = make_problem(name, scale, exclude_self=True)
    w = weights(p.q.shape[0], torch.float64)
    via_none = evaluate(ops.pair_stats, p, w=w)
    q = p.q.clone().requires_grad_()
    out = ops.pair_stats(q, q, p.q_label, p.q_label, p.q_group, p.q_group, **p.kwargs)
    for a, b in zip(out, via_none[:3]):
        assert torch.equal(a.detach(), b)
    loss = (w[0] * torch.where(torch.isfinite(out[0]), out[0], 0.0)).sum() + \
        (w[1] * out[1]).sum()
    (g_self,) = torch.autograd.grad(loss, q)
    assert torch.equal(g_self, via_none[3][0])

    general = Problem(p.q, p.q.clone(), p.q_label, p.q_label.clone(), p.q_group,
                      None if p.q_group is None else p.q_group.clone(), p.kwargs)
    lse, pos_mean, pos_count, (gq, gk) = evaluate(ops.pair_stats, general, w=w)
    assert torch.equal(pos_count, via_none[2])
    assert_close_scaled(lse, via_none[0], F64_RTOL)
    assert_close_scaled(pos_mean, via_none[1], F64_RTOL)
    assert_close_scaled(gq + gk, g_self, F64_RTOL)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name", ["self_tiles", "tiles"])
def test_thread_counts_agree_with_reference(name, threads, num_threads):
    """Different thread counts split the tiles into different chunks (3 row tiles, 6 upper
    tile pairs here); each split still matches the reference."""
    num_threads(threads)
    extra = {"exclude_self": True} if name.startswith("self") else {}
    for scale in ("unit", "x10"):
        check_against_reference(make_problem(name, scale, **extra),
                                name=f"{name}/{scale}/{threads} threads")


@pytest.mark.parametrize("name", ["self_tiles", "tiles"])
def test_deterministic_for_fixed_thread_count(name, num_threads):
    num_threads(2)
    extra = {"exclude_self": True} if name.startswith("self") else {}
    for scale in ("unit", "x10"):
        p = make_problem(name, scale, dtype=torch.float32, **extra)
        first = evaluate(ops.pair_stats, p)
        second = evaluate(ops.pair_stats, p)
        for a, b in zip(first[:3] + tuple(first[3]), second[:3] + tuple(second[3])):
            assert torch.equal(a, b), f"{name}/{scale}: two calls differ"


# ------------------------------------------------------------------------- half precision

@pytest.mark.parametrize("scale", ["unit", "x10"])
@pytest.mark.parametrize("name", ["tiles_small", "self_tiles_small"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, name, scale, device):
    """Stats in float32, gradients in the input dtype; errors against float64 (from the same
    half values) within the low-precision rule (conftest.assert_close_half_rule)."""
    extra = {"exclude_self": True} if name.startswith("self") else {}
    check_low_precision(make_problem(name, scale, dtype=dtype, device=device, **extra), dtype)


# ------------------------------------------------------------------------------ gradcheck

GRADCHECK_CASES = {
    "general": lambda g: (torch.randn(6, 3, generator=g, dtype=torch.float64),
                          torch.randn(5, 3, generator=g, dtype=torch.float64),
                          torch.tensor([0, 1, 0, 2, 1, 5]), torch.tensor([1, 0, 0, 2, 1]),
                          None, None, {}),
    "general_groups": lambda g: (torch.randn(6, 4, generator=g, dtype=torch.float64),
                                 torch.randn(7, 4, generator=g, dtype=torch.float64),
                                 torch.tensor([0, 1, 0, 1, -1, 0]),
                                 torch.tensor([1, 0, 0, 1, 1, -1, 0]),
                                 torch.tensor([0, 0, 1, 1, 2, 3]),
                                 torch.tensor([0, 1, 0, 1, 0, 1, 3]), {}),
    "self": lambda g: (torch.randn(7, 3, generator=g, dtype=torch.float64), None,
                       torch.tensor([0, 1, 0, 2, 1, 1, -1]), None, None, None,
                       {"exclude_self": True}),
    "self_groups": lambda g: (torch.randn(7, 5, generator=g, dtype=torch.float64), None,
                              torch.tensor([0, 1, 0, 0, 1, 1, 2]), None,
                              torch.tensor([0, 0, 0, 1, 1, 1, 2]), None,
                              {"exclude_self": True}),
    "self_keep_diagonal": lambda g: (torch.randn(5, 3, generator=g, dtype=torch.float64), None,
                                     torch.tensor([0, 1, 0, 2, 1]), None, None, None, {}),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 4.0])  # 4.0: |s|/tau beyond the fixed-shift range
@pytest.mark.parametrize("denominator", ["all", "negatives"])
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck(case, denominator, scale, seed):
    q, k, ql, kl, qg, kg, kw = GRADCHECK_CASES[case](generator(seed))
    q = (F.normalize(q, dim=1) * scale).requires_grad_()
    k = None if k is None else (F.normalize(k, dim=1) * scale).requires_grad_()
    assert uses_fixed_shift(q, k, 0.3) == (scale == 1.0)

    def fn(*xs):
        lse, pos_mean, _ = ops.pair_stats(xs[0], xs[1] if len(xs) > 1 else None, ql, kl, qg, kg,
                                          tau=0.3, denominator=denominator, **kw)
        return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)), pos_mean

    inputs = (q,) if k is None else (q, k)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------- layouts, odd shapes

@pytest.mark.parametrize("self_mode", [False, True])
def test_non_contiguous_inputs(self_mode, device):
    """Transposed and strided views (features, labels, groups) give the contiguous result."""
    g = generator(5)
    n, m, d = 300, 270, 33
    q = torch.randn(d, n, generator=g).t()  # transposed
    k = torch.randn(m, 2 * d, generator=g)[:, ::2]  # strided columns
    ql = torch.randint(0, 3, (2 * n,), generator=g)[::2]
    kl = torch.randint(0, 3, (2 * m,), generator=g)[::2]
    qg = torch.randint(0, 2, (n, 2), generator=g)[:, 1]
    kg = torch.randint(0, 2, (m, 2), generator=g)[:, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or ql.is_contiguous()
                or qg.is_contiguous())
    if self_mode:
        views = Problem(q, None, ql, None, qg, None, {"tau": 0.1, "exclude_self": True})
    else:
        views = Problem(q, k, ql, kl, qg, kg, {"tau": 0.1})
    views = views.to(device)
    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    dense = Problem(cont(views.q), cont(views.k), cont(views.q_label), cont(views.k_label),
                    cont(views.q_group), cont(views.k_group), views.kwargs)
    assert dense.q.is_contiguous()
    a = evaluate(ops.pair_stats, views)
    b = evaluate(ops.pair_stats, dense)
    assert_matches(a, b, 1e-6)


@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (0, 0), (0, None), (5, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_inputs(n, m, dtype, device):
    """Empty q or k: [N]-shaped statistics (-inf lse, 0 pos_mean/count without columns) and
    zero gradients of the right shape and dtype. (5, None) is self mode with every row
    ignored."""
    d = 4
    q = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    ql = torch.zeros(n, dtype=torch.long, device=device)
    if m is None and n:
        ql -= 1  # every row ignored: nothing counts
    k = None if m is None else torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
    kl = None if m is None else torch.zeros(m, dtype=torch.long, device=device)
    lse, pos_mean, pos_count = ops.pair_stats(q, k, ql, kl, tau=0.1,
                                              exclude_self=(m is None or m == n))
    assert lse.shape == pos_mean.shape == pos_count.shape == (n,)
    assert lse.dtype == pos_mean.dtype == torch.float32 and pos_count.dtype == torch.long
    assert torch.isneginf(lse).all() and (pos_mean == 0).all() and (pos_count == 0).all()
    loss = torch.where(torch.isfinite(lse), lse, 0.0).sum() + (2 * pos_mean).sum()
    inputs = [q] if k is None else [q, k]
    grads = torch.autograd.grad(loss, inputs, allow_unused=False)
    for x, gx in zip(inputs, grads):
        assert gx.shape == x.shape and gx.dtype == dtype and (gx == 0).all()


@pytest.mark.parametrize("d", [1, 3, 33, 130])
def test_odd_feature_widths(d):
    g = generator(d)
    for m in (None, 45):
        q = torch.randn(40, d, generator=g, dtype=torch.float64)
        k = None if m is None else torch.randn(m, d, generator=g, dtype=torch.float64)
        p = Problem(q, k, torch.randint(0, 3, (40,), generator=g),
                    None if m is None else torch.randint(0, 3, (m,), generator=g),
                    kwargs={"tau": 0.2, "exclude_self": m is None})
        check_against_reference(p, name=f"D={d}")


# ------------------------------------------------------------------ torch.library / compile

OPCHECK_CASES = {
    "general": lambda q, k, ql, kl, qg, kg: (q, k, ql, kl, None, None, 0.1, False, False, -1),
    "general_groups_negatives": lambda q, k, ql, kl, qg, kg: (q, k, ql, kl, qg, kg, 0.2, False,
                                                              True, -1),
    "self": lambda q, k, ql, kl, qg, kg: (q, None, ql, None, None, None, 0.1, True, False, -1),
    "self_groups_negatives": lambda q, k, ql, kl, qg, kg: (q, None, ql, None, qg, None, 0.1, True,
                                                           True, 2),
}


@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in sorted(OPCHECK_CASES)]
                         + [("general", torch.bfloat16), ("self", torch.bfloat16)])
def test_opcheck(case, dtype):
    """Schema, autograd registration, fake kernel and AOT dispatch (dynamic shapes) of the op,
    all four default opcheck sub-tests."""
    g = generator(6)
    q = torch.randn(11, 5, generator=g).to(dtype).requires_grad_()
    k = torch.randn(13, 5, generator=g).to(dtype).requires_grad_()
    ql, kl = torch.randint(-1, 3, (11,), generator=g), torch.randint(-1, 3, (13,), generator=g)
    qg, kg = torch.randint(0, 2, (11,), generator=g), torch.randint(0, 2, (13,), generator=g)
    args = OPCHECK_CASES[case](q, k, ql, kl, qg, kg)
    torch.library.opcheck(torch.ops.fastiml.pair_stats.default, args)


def test_opcheck_backward_op():
    """The backward is its own op (STYLE rule 4): its schema and fake kernel hold too. No
    input requires grad (the backward op has no autograd formula of its own), so the
    autograd-registration sub-test has nothing to check and is left out."""
    g = generator(7)
    q, k = torch.randn(9, 4, generator=g), torch.randn(8, 4, generator=g)
    ql, kl = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (8,), generator=g)
    lse, _, pos_count = ops.pair_stats(q, k, ql, kl, tau=0.1)
    gl, gp = torch.randn(9, generator=g), torch.randn(9, generator=g)
    for needs in ((True, True), (True, False), (False, True)):
        args = (gl, gp, q, k, ql, kl, None, None, lse, pos_count, 0.1, False, False, -1, *needs)
        torch.library.opcheck(torch.ops.fastiml.pair_stats_backward.default, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor",
                                                               marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """One case: a loss over pair_stats compiled whole (fake kernels, autograd op, backward op
    in the graph) gives eager's value and gradients. aot_eager checks the capture quickly;
    inductor also generates code (~40 s cold on 2 cores, hence slow)."""
    torch._dynamo.reset()
    g = generator(8)
    q0, k0 = torch.randn(70, 6, generator=g), torch.randn(90, 6, generator=g)
    ql, kl = torch.randint(0, 3, (70,), generator=g), torch.randint(0, 3, (90,), generator=g)
    w = torch.randn(70, generator=g)

    def loss_fn(q, k):
        qn = F.normalize(q, dim=1)
        lse, pos_mean, pos_count = ops.pair_stats(qn, k, ql, kl, tau=0.1,
                                                  denominator="negatives")
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (w * lse).sum() + (w * pos_mean).sum() + pos_count.sum() * 0

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    results = []
    for fn in (loss_fn, compiled):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        loss = fn(q, k)
        results.append((loss.detach(), *torch.autograd.grad(loss, (q, k))))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_autocast_cpu_bf16_gives_float32_stats():
    """Under CPU autocast the op runs on the bf16 activations it receives (no upcast) and
    returns float32 statistics; gradients reach the float32 parameters."""
    g = generator(9)
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(300, 8, generator=g)
    lab = torch.randint(0, 3, (300,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        lse, pos_mean, pos_count = ops.pair_stats(h, None, lab, None, tau=0.5, exclude_self=True)
        lse32, _, _ = ops.pair_stats(h.float(), None, lab, None, tau=0.5, exclude_self=True)
    assert lse.dtype == pos_mean.dtype == lse32.dtype == torch.float32
    outside = ops.pair_stats(h.detach(), None, lab, None, tau=0.5, exclude_self=True)
    for a, b in zip((lse, pos_mean, pos_count), outside):
        assert torch.equal(a.detach(), b)
    ((lse - pos_mean) * (pos_count > 0)).sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()
    assert lin.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ bad inputs

def _bad_input_cases():
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    ql, kl = torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    g4, g5 = torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    ok = dict(q=q, k=k, q_label=ql, k_label=kl)
    return [
        ("q_rank", dict(ok, q=torch.randn(4, 3, 1)), ValueError, r"\bq\b.*2-D"),
        ("q_rank_1", dict(ok, q=torch.randn(4)), ValueError, r"\bq\b.*2-D"),
        ("k_rank", dict(ok, k=torch.randn(5)), ValueError, r"\bk\b.*2-D"),
        ("d_mismatch", dict(ok, k=torch.randn(5, 4)), ValueError, r"\bk\b.*D=3"),
        ("q_label_length", dict(ok, q_label=torch.zeros(3, dtype=torch.long)), ValueError,
         r"q_label.*\[4\]"),
        ("k_label_length", dict(ok, k_label=torch.zeros(4, dtype=torch.long)), ValueError,
         r"k_label.*\[5\]"),
        ("q_label_2d", dict(ok, q_label=torch.zeros(4, 1, dtype=torch.long)), ValueError,
         r"q_label"),
        ("float_q_label", dict(ok, q_label=torch.zeros(4)), TypeError, r"q_label.*integer"),
        ("float_k_label", dict(ok, k_label=torch.zeros(5)), TypeError, r"k_label.*integer"),
        ("bool_q_label", dict(ok, q_label=torch.zeros(4, dtype=torch.bool)), TypeError,
         r"q_label"),
        ("list_q_label", dict(ok, q_label=[0, 0, 0, 0]), TypeError, r"q_label.*Tensor"),
        ("q_not_tensor", dict(ok, q=[[0.0] * 3] * 4), TypeError, r"\bq\b.*Tensor"),
        ("int_q", dict(ok, q=torch.zeros(4, 3, dtype=torch.long)), TypeError, r"\bq\b.*float"),
        ("tau_zero", dict(ok, tau=0.0), ValueError, r"\btau\b"),
        ("tau_negative", dict(ok, tau=-0.1), ValueError, r"\btau\b"),
        ("tau_nan", dict(ok, tau=float("nan")), ValueError, r"\btau\b"),
        ("tau_tensor", dict(ok, tau=torch.tensor(0.1)), ValueError, r"\btau\b"),
        ("tau_inf", dict(ok, tau=float("inf")), ValueError, r"\btau\b"),
        ("tau_bool", dict(ok, tau=True), ValueError, r"\btau\b"),
        ("ignore_index_float", dict(ok, ignore_index=-1.0), TypeError, r"ignore_index"),
        ("ignore_index_bool", dict(ok, ignore_index=False), TypeError, r"ignore_index"),
        ("ignore_index_tensor", dict(ok, ignore_index=torch.tensor(-1)), TypeError,
         r"ignore_index"),
        ("exclude_self_n_ne_m", dict(ok, exclude_self=True), ValueError, r"exclude_self.*N == M"),
        ("bad_denominator", dict(ok, denominator="positives"), ValueError, r"denominator"),
        ("k_without_k_label", dict(ok, k_label=None), ValueError, r"k_label"),
        ("k_label_without_k", dict(ok, k=None), ValueError, r"k_label"),
        ("k_group_without_k", dict(q=q, k=None, q_label=ql, k_label=None, k_group=g4),
         ValueError, r"k_group"),
        ("q_group_only", dict(ok, q_group=g4), ValueError, r"q_group and k_group"),
        ("k_group_only", dict(ok, k_group=g5), ValueError, r"q_group and k_group"),
        ("q_group_length", dict(ok, q_group=g5, k_group=g5), ValueError, r"q_group.*\[4\]"),
        ("k_group_length", dict(ok, q_group=g4, k_group=g4), ValueError, r"k_group.*\[5\]"),
        ("float_q_group", dict(ok, q_group=g4.float(), k_group=g5), TypeError, r"q_group"),
        ("mixed_dtypes", dict(ok, k=k.double()), TypeError, r"\bk\b.*dtype"),
        ("mixed_devices_k", dict(ok, k=k.to("meta")), ValueError, r"\bk\b.*device"),
        ("mixed_devices_q_label", dict(ok, q_label=ql.to("meta")), ValueError,
         r"q_label.*cpu"),
        ("mixed_devices_k_label", dict(ok, k_label=kl.to("meta")), ValueError,
         r"k_label.*cpu"),
        ("mixed_devices_group", dict(ok, q_group=g4, k_group=g5.to("meta")), ValueError,
         r"k_group.*cpu"),
    ]


_BAD = _bad_input_cases()


@pytest.mark.parametrize("args,error,match", [c[1:] for c in _BAD], ids=[c[0] for c in _BAD])
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    args = dict(args)
    q, k, ql, kl = args.pop("q"), args.pop("k"), args.pop("q_label"), args.pop("k_label")
    qg, kg = args.pop("q_group", None), args.pop("k_group", None)
    with pytest.raises(error, match=match):
        ops.pair_stats(q, k, ql, kl, qg, kg, **args)


def test_raw_op_checks_its_inputs():
    """Callers of torch.ops.fastiml.pair_stats who bypass fastiml.ops still get a clear error
    rather than a crash."""
    q, ql = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="q_label"):
        torch.ops.fastiml.pair_stats(q, None, ql[:3], None, None, None, 0.1, False, False, -1)
    with pytest.raises(RuntimeError, match="tau"):
        torch.ops.fastiml.pair_stats(q, None, ql, None, None, None, 0.0, False, False, -1)
    with pytest.raises(RuntimeError, match="exclude_self"):
        torch.ops.fastiml.pair_stats(q, torch.randn(5, 3), ql, torch.zeros(5, dtype=torch.long),
                                     None, None, 0.1, True, False, -1)
