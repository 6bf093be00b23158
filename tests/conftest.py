"""Shared fixtures and helpers of the fastiml tests (STYLE rule 11).

* ``device``: every op test runs on "cpu" and on "cuda"; the CUDA case is skipped, with the
  reason shown in the report, where no GPU (or no CUDA build of the extension) is present --
  it never passes silently.
* ``seed``: every test starts from the same torch RNG state (autouse).
* ``num_threads``: pins torch's intra-op thread count for a test and restores it afterwards.
* ``assert_close_half_rule``: the low-precision rule -- the error against a float64 ground truth
  of the same input values, per row, bounded by a documented multiple of the dtype's epsilon
  times the float64 result's scale (its docstring derives the bound).
"""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("fastiml") is None:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastiml import ops  # noqa: E402  (after the path fix above)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores "
                                       "(deselect with -m 'not slow')")


# ---------------------------------------------------------------------------------- devices

def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if not ops.compiled_with_cuda():
        return "fastiml._C was built without its CUDA kernels"
    return None


_CUDA_SKIP = _cuda_skip_reason()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_SKIP is not None,
                                                  reason=_CUDA_SKIP or "")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on (a string)."""
    return request.param


# ---------------------------------------------------------------------------------- seeding

SEED = 0


@pytest.fixture(autouse=True)
def seed():
    """Seeds torch's global RNG before every test; returns the seed."""
    torch.manual_seed(SEED)
    return SEED


def generator(seed: int = SEED) -> torch.Generator:
    """A CPU generator, for tests that want their own stream of random numbers."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture
def num_threads():
    """``num_threads(n)`` pins torch's intra-op thread count; restored after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- tolerances

def assert_same_neg_inf(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """The -inf entries (empty log-sum-exp) are the same, and nothing is NaN or +inf."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result"
    assert not torch.isposinf(actual).any(), f"{name}: +inf in the result"
    mismatch = torch.isneginf(actual).cpu() != torch.isneginf(expected).cpu()
    assert not mismatch.any(), (f"{name}: -inf pattern differs at rows "
                                f"{mismatch.nonzero().flatten().tolist()[:20]}")


EPS32 = torch.finfo(torch.float32).eps
HALF_RULE_FACTOR = 2.0


def similarity_span(q: torch.Tensor, k, tau: float) -> float:
    """``S = max_i |q_i| max_j |k_j| / tau`` (``k`` None: self mode), the bound on |s_ij| that
    the errors of the similarities scale with."""
    nq = q.detach().double().norm(dim=1).max().item() if q.shape[0] else 0.0
    nk = nq if k is None else (k.detach().double().norm(dim=1).max().item() if k.shape[0] else 0.0)
    return nq * nk / tau


def float32_arg_error(span: float, terms: int) -> float:
    """The error float32 arithmetic leaves in the arguments of the exponentials: a similarity of
    size up to ``span`` rounded a few times (``eps32 * span``), and a sum of ``terms``
    exponentials whose roundings, of random sign, add up to ``~sqrt(terms) eps32`` relative
    (which moves a log-sum-exp, or the weights of a gradient, as an argument error would)."""
    return EPS32 * (span + math.sqrt(max(terms, 1)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double().cpu()
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t[:, None] if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def assert_close_half_rule(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                           name: str = "", *, arg_error: float = 0.0, log_domain: bool = False,
                           factor: float = HALF_RULE_FACTOR) -> float:
    """The low-precision rule: ``actual`` against ``exact``, the float64 result of the *same*
    input values (already exact in the low dtype), row by row. Returns the margin, the largest
    ratio error / bound (<= 1 passes), so that its use can be measured.

    Rows: the last dimension of a result of 2 or more dimensions (a feature row's gradient),
    each entry of a 1-D one, the value of a 0-D one. For row i, ``y_i`` its float64 value and
    ``err_i = ||actual_i - y_i||_2``:

        relative results    err_i <= factor * (eps + arg_error) * max(||y_i||, rms_j ||y_j||)
        log-domain results  err_i <= factor * (eps * |y_i| + arg_error)

    with ``eps = torch.finfo(dtype).eps`` -- ``dtype`` the one the result is rounded to: the
    half dtype for gradients, float32 for the statistics a half op returns in float32.

    Derivation. The op reads exactly representable inputs, computes in float32 and rounds its
    result to ``dtype``:

    * rounding to ``dtype`` moves each entry by at most eps/2 of itself, so a row by at most
      ``eps/2 * ||y_i||``; the tensor-core backward also rounds G (the weight of each pair) to
      the input dtype before its product (as FlashAttention rounds P), another eps/2 relative on
      each term of the row's sum. Together ``eps * ||y_i||``. This is the floor a correct
      kernel cannot go under: gradients come back in the input dtype.
    * ``arg_error`` is the absolute error in the arguments s_ij of the exponentials, committed
      before them: float32's (``float32_arg_error``: ``eps32 * S`` with
      ``S = max|q_i| max|k_j| / tau``, the bound of |s_ij|), plus, where the op itself rounds its
      inputs to ``dtype`` first (normalising or scaling features in half precision), that
      rounding: ``|sum_d dq_d k_d| <= eps/2 |q| |k|``, i.e. ``eps/2 * S``. Exponentials and
      their weighted sums (probabilities, gradients, softplus sums) move by the argument error
      *relative* to themselves (``d e^s = e^s ds``); log-sum-exps, means of similarities and
      losses made of them by at most the argument error *absolutely*
      (``d lse = sum_j p_j ds_j``, ``|d lse| <= max_j |ds_j|``) -- ``log_domain``.
    * A row whose terms cancel (a gradient much smaller than the rows around it) carries the
      rounding of its terms, which are as large as a typical row: relative results are judged
      at no less than the root-mean-square row norm. (A model of the tensor-core backward --
      G rounded to bfloat16, exact products -- gives a self-mode row at 1/10 of the median norm
      a 2.6 % error: 3.3 eps of its own norm, 0.21 eps of the rms.)
    * ``factor`` = 2: the margin for what the two terms leave out (dot products of D terms,
      the exponential's own rounding, the order of the sums). Measured: the worst row of every
      test that uses the rule takes at most 0.38 of the bound on the CPU kernels, and 0.34 on
      that model of the tensor-core backward.

    Tight enough to matter: in bfloat16 a row may be off by 2 * 2^-7 = 1.6 % of its norm (of
    the rms row norm at least), in float16 by 0.2 %; gradients 5 % too large, with their
    smallest entries zeroed, or with the smallest entries' signs flipped fail. -inf entries
    (empty log-sum-exps) must match exactly; NaN and +inf fail.
    """
    assert actual.shape == exact.shape, (f"{name}: shape {tuple(actual.shape)} vs "
                                         f"{tuple(exact.shape)}")
    if exact.is_floating_point():
        assert_same_neg_inf(actual, exact, name)
    a, y = _rows(actual), _rows(exact)
    finite = torch.isfinite(y).all(1)  # -inf rows: matched above
    a, y = a[finite], y[finite]
    if not y.numel():
        return 0.0
    err = (a - y).norm(dim=1)
    size = y.norm(dim=1)
    eps = torch.finfo(dtype).eps
    if log_domain:
        bound = factor * (eps * size + arg_error)
    else:
        bound = factor * (eps + arg_error) * size.clamp(min=size.pow(2).mean().sqrt().item())
    # A result that is exactly 0 everywhere must come back exactly 0.
    ratio = torch.where(bound > 0, err / bound.clamp(min=1e-300),
                        torch.where(err > 0, math.inf, 0.0))
    worst = int(ratio.argmax())
    margin = ratio[worst].item()
    assert margin <= 1.0, (f"{name}: row error {err[worst]:.3g} > bound {bound[worst]:.3g} "
                           f"(row norm {size[worst]:.3g}, eps({dtype}) = {eps:.3g}, arg_error "
                           f"{arg_error:.3g}, {'log-domain' if log_domain else 'relative'}) "
                           f"at row {worst} of the finite rows; {(ratio > 1).sum().item()} of "
                           f"{len(ratio)} rows over")
    return margin


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                        name: str = "", atol_floor: float = 0.0) -> None:
    """``assert_close`` with ``atol = rtol * max|expected|`` (so that tiny entries of a large
    result are judged against the result's scale), NaN-free, -inf entries matched exactly.
    ``atol_floor``: the rounding error of the inputs the result is computed from, for results
    that cancel to (near) zero."""
    assert actual.shape == expected.shape, (f"{name}: shape {tuple(actual.shape)} vs "
                                            f"{tuple(expected.shape)}")
    a, e = actual.detach(), expected.detach().to(actual.device)
    if e.is_floating_point():
        assert_same_neg_inf(a, e, name)
        finite = torch.isfinite(e)
        a, e = a[finite].double(), e[finite].double()
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol,
                               atol=max(rtol * max(scale, 1e-3), atol_floor),
                               msg=lambda m: f"{name}: {m}")
