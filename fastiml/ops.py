"""The fused ops of fastiml, typed and checked.

The only module that touches the compiled extension. Each op is a ``torch.library`` custom op
(schemas in ``csrc/fastiml.cpp``) with a fake kernel, so it runs under ``torch.compile``, and an
autograd rule whose backward is itself an op. Arguments are checked here, before any kernel
runs, with errors that name the argument and what was expected.

Dtypes: inputs may be float32, float16 or bfloat16 (float64 for gradcheck); all accumulation is
in float32 (float64 for float64 inputs); statistics come back in float32 (float64), gradients in
the input dtype.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ABI_VERSION = 1  # must match FASTIML_ABI_VERSION in csrc/fastiml.cpp
_OPS = ("pair_stats", "pair_stats_backward", "contour_mine", "contour_band",
        "pivot_consistency", "pivot_consistency_backward")
_REBUILD = ("rebuild it from the repository root with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)")

try:
    from fastiml import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(f"fastiml's compiled extension fastiml._C could not be loaded ({e}); "
                      f"{_REBUILD}") from e
if _C.abi_version() != _ABI_VERSION or not all(hasattr(torch.ops.fastiml, op) for op in _OPS):
    raise ImportError(f"fastiml's compiled extension is stale (schema version "
                      f"{_C.abi_version()}, this code needs {_ABI_VERSION}); {_REBUILD}")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def compiled_with_cuda() -> bool:
    """Whether the compiled module holds the CUDA kernels."""
    return bool(_C.compiled_with_cuda())


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_features(name: str, x, rows_name: str = "N") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{rows_name}, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _check_index_vector(name: str, t, length: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the features, got {t.device}")


# ---------------------------------------------------------------------------------------------
# pair_stats
# ---------------------------------------------------------------------------------------------

def pair_stats(q: Tensor, k: Optional[Tensor], q_label: Tensor, k_label: Optional[Tensor],
               q_group: Optional[Tensor] = None, k_group: Optional[Tensor] = None, *,
               tau: float = 0.1, exclude_self: bool = False, denominator: str = "all",
               ignore_index: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused pairwise-similarity statistics; never materialises the N x M similarity matrix.

    With ``s_ij = <q_i, k_j> / tau``, column j *counts* for row i when neither label is
    ``ignore_index``, the groups match (when given) and not (``exclude_self`` and i == j); among
    counted columns, j is a *positive* of i when the labels are equal.

    Args:
        q: Tensor[N, D] rows (float32/float16/bfloat16/float64).
        k: Tensor[M, D] columns, same dtype and device; ``None`` (or ``q`` itself, with
            ``k_label is q_label`` and ``k_group is q_group``) means self-contrast, which uses
            the symmetry of the problem (about half the work) and returns one gradient.
        q_label, k_label: integer Tensor[N], Tensor[M] (any values; ``ignore_index`` marks
            entries that take no part).
        q_group, k_group: optional integer Tensor[N], Tensor[M]; rows only meet columns of the
            same group (e.g. image index, to contrast within each image). Both or neither.
        tau: temperature, > 0.
        exclude_self: drop the pair (i, i); needs N == M (q and k are the same set).
        denominator: ``"all"`` -- log-sum-exp over every counted column (SupCon) -- or
            ``"negatives"`` -- over counted columns with a different label (MPC / FOCAL).

    Returns:
        ``lse`` Tensor[N]: log sum of exp(s_ij) over the denominator set (-inf if empty);
        ``pos_mean`` Tensor[N]: mean s_ij over positives (0 if none);
        ``pos_count`` int64 Tensor[N]: number of positives.
        Statistics are float32 (float64 for float64 inputs). Differentiable in ``q`` and ``k``
        through ``lse`` and ``pos_mean``.

    Memory is O((N + M) D) plus fixed-size tiles. The CPU kernel is deterministic for a given
    number of threads.
    """
    _check_features("q", q)
    self_contrast = k is None or (k is q and k_label is q_label and k_group is q_group)
    if k is None and (k_label is not None or k_group is not None):
        raise ValueError("k_label and k_group must be None when k is None (self-contrast)")
    n = q.shape[0]
    _check_index_vector("q_label", q_label, n, q.device)
    if not self_contrast:
        _check_features("k", k, "M")
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"k must have D={q.shape[1]} columns like q, got {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
        if k.device != q.device:
            raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
        if k_label is None:
            raise ValueError("k_label is required when k is given")
        _check_index_vector("k_label", k_label, k.shape[0], q.device)
    if (q_group is None) != (k_group is None) and not (self_contrast and k_group is None):
        raise ValueError("q_group and k_group must both be given or both be None")
    if q_group is not None:
        _check_index_vector("q_group", q_group, n, q.device)
        if not self_contrast:
            _check_index_vector("k_group", k_group, k.shape[0], q.device)
    if not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    if denominator not in ("all", "negatives"):
        raise ValueError(f"denominator must be 'all' or 'negatives', got {denominator!r}")
    if exclude_self and not self_contrast and k.shape[0] != n:
        raise ValueError(f"exclude_self needs q and k to be the same set (N == M), got "
                         f"N={n}, M={k.shape[0]}")
    as_long = lambda t: None if t is None else t.long()  # noqa: E731
    return torch.ops.fastiml.pair_stats(
        q, None if self_contrast else k, q_label.long(),
        None if self_contrast else k_label.long(), as_long(q_group),
        None if self_contrast else as_long(k_group), float(tau), bool(exclude_self),
        denominator == "negatives", int(ignore_index))


@torch.library.register_fake("fastiml::pair_stats")
def _pair_stats_fake(q, k, q_label, k_label, q_group, k_group, tau, exclude_self,
                     negatives_only, ignore_index):
    n, dtype = q.shape[0], _stat_dtype(q.dtype)
    return q.new_empty(n, dtype=dtype), q.new_empty(n, dtype=dtype), q.new_empty(
        n, dtype=torch.long)


@torch.library.register_fake("fastiml::pair_stats_backward")
def _pair_stats_backward_fake(grad_lse, grad_pos_mean, q, k, q_label, k_label, q_group, k_group,
                              lse, pos_count, tau, exclude_self, negatives_only, ignore_index,
                              q_needs_grad, k_needs_grad):
    grad_q = torch.empty_like(q) if q_needs_grad else q.new_empty(0)
    grad_k = torch.empty_like(k) if (k is not None and k_needs_grad) else q.new_empty(0)
    return grad_q, grad_k


def _pair_stats_setup_context(ctx, inputs, output):
    q, k, q_label, k_label, q_group, k_group, tau, exclude_self, negatives_only, ignore_index = \
        inputs
    lse, _, pos_count = output
    ctx.save_for_backward(q, k, q_label, k_label, q_group, k_group, lse, pos_count)
    ctx.args = (tau, exclude_self, negatives_only, ignore_index)


def _pair_stats_backward(ctx, grad_lse, grad_pos_mean, _grad_count):
    q, k, q_label, k_label, q_group, k_group, lse, pos_count = ctx.saved_tensors
    q_needs, k_needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    if grad_pos_mean is None:
        grad_pos_mean = torch.zeros_like(lse)
    grad_q, grad_k = torch.ops.fastiml.pair_stats_backward(
        grad_lse, grad_pos_mean, q, k, q_label, k_label, q_group, k_group, lse, pos_count,
        *ctx.args, q_needs, k is not None and k_needs)
    return (grad_q if q_needs else None, grad_k if (k is not None and k_needs) else None,
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastiml::pair_stats", _pair_stats_backward,
                                setup_context=_pair_stats_setup_context)
