"""The low-precision rule: how far a float16 / bfloat16 result may be from float64.

One rule for the test suite (``tests/conftest.py``: ``assert_close_half_rule``) and for
``fastiml selftest``, so that what the suite demands on the CPU is what the selftest demands on
a GPU. ``half_rule`` measures a result against the float64 result of the *same* input values
and returns the margin (largest ratio error / bound over the rows; <= 1 passes); the derivation
of the bound is in its docstring.
"""
import math
from typing import NamedTuple, Optional

import torch

EPS32 = torch.finfo(torch.float32).eps
HALF_RULE_FACTOR = 2.0


def similarity_span(q: torch.Tensor, k: Optional[torch.Tensor], tau: float) -> float:
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


class HalfRule(NamedTuple):
    """The outcome of ``half_rule``: ``margin`` = max over rows of error / bound (<= 1 passes;
    inf for a mismatch the bound cannot judge: shape, NaN, +inf, -inf pattern), the worst row's
    ``error`` and ``bound``, and ``message``, what a failure report says."""
    margin: float
    error: float
    bound: float
    message: str

    @property
    def ok(self) -> bool:
        return self.margin <= 1.0


def half_rule(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, *,
              arg_error: float = 0.0, log_domain: bool = False,
              factor: float = HALF_RULE_FACTOR) -> HalfRule:
    """The low-precision rule: ``actual`` against ``exact``, the float64 result of the *same*
    input values (already exact in the low dtype), row by row.

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
    def mismatch(message):
        return HalfRule(math.inf, math.inf, 0.0, message)

    if actual.shape != exact.shape:
        return mismatch(f"shape {tuple(actual.shape)} vs {tuple(exact.shape)}")
    a, y = _rows(actual), _rows(exact)
    if exact.is_floating_point():
        if torch.isnan(a).any():
            return mismatch("NaN in the result")
        if torch.isposinf(a).any():
            return mismatch("+inf in the result")
        differ = torch.isneginf(a) != torch.isneginf(y)
        if differ.any():
            rows = differ.any(1).nonzero().flatten().tolist()[:20]
            return mismatch(f"-inf pattern differs at rows {rows}")
    finite = torch.isfinite(y).all(1)  # -inf rows: matched above
    a, y = a[finite], y[finite]
    if not y.numel():
        return HalfRule(0.0, 0.0, 0.0, "")
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
    message = (f"row error {err[worst]:.3g} > bound {bound[worst]:.3g} (row norm "
               f"{size[worst]:.3g}, eps({dtype}) = {eps:.3g}, arg_error {arg_error:.3g}, "
               f"{'log-domain' if log_domain else 'relative'}) at row {worst} of the finite "
               f"rows; {(ratio > 1).sum().item()} of {len(ratio)} rows over")
    return HalfRule(margin, err[worst].item(), bound[worst].item(),
                    message if margin > 1.0 else "")
