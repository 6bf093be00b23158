"""The fused ops of fastiml, typed and checked.

The only module that touches the compiled extension. Each op is a ``torch.library`` custom op
(schemas in ``csrc/fastiml.cpp``) with a fake kernel, so it runs under ``torch.compile``, and an
autograd rule whose backward is itself an op. Arguments are checked here, before any kernel
runs, with errors that name the argument and what was expected.

Dtypes: inputs may be float32, float16 or bfloat16 (float64 for gradcheck); all accumulation is
in float32 (float64 for float64 inputs); statistics come back in float32 (float64), gradients in
the input dtype.
"""
import functools
import math
import numbers
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

_ABI_VERSION = 7  # must match FASTIML_ABI_VERSION in csrc/fastiml.cpp
_OPS = ("pair_stats", "pair_stats_backward", "contour_mine", "contour_band",
        "pivot_consistency", "pivot_consistency_backward",
        "pair_softplus", "pair_softplus_backward", "clip_lse", "clip_lse_backward",
        "siglip_loss", "siglip_loss_backward", "row_lse")
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


def arch_list_covers(sass: Sequence[int], ptx: Sequence[int], capability: Tuple[int, int]) -> bool:
    """Whether kernels built for ``sass`` machine code and ``ptx`` (archs as 80, 90, ...) run on a
    GPU of compute ``capability`` (major, minor): machine code runs on its own major version at
    an equal or higher minor; PTX compiles for any equal or newer GPU."""
    major, minor = capability
    device = 10 * major + minor
    return (any(a // 10 == major and a % 10 <= minor for a in sass)
            or any(a <= device for a in ptx))


@functools.lru_cache(maxsize=None)
def _cuda_kernel_problem(index: int) -> Optional[str]:
    """Why this build cannot run its CUDA kernels on GPU ``index`` (None: it can)."""
    if not compiled_with_cuda():
        return ("fastiml was built without its CUDA kernels (torch without CUDA, or no CUDA "
                f"toolkit found at build time): {_REBUILD} with FASTIML_CUDA=1")
    sass, ptx = _C.cuda_archs()
    capability = torch.cuda.get_device_capability(index)
    if arch_list_covers(sass, ptx, capability):
        return None
    built = ";".join(f"{a // 10}.{a % 10}" + ("+PTX" if a in ptx else "") for a in sass)
    own = f"{capability[0]}.{capability[1]}"
    return (f"fastiml's CUDA kernels were built for TORCH_CUDA_ARCH_LIST={built}, which has no "
            f"kernel for this GPU ({torch.cuda.get_device_name(index)}, compute capability "
            f"{own}); rebuild with TORCH_CUDA_ARCH_LIST=\"{own}\" (or add \"{own}\" to the "
            f"list): {_REBUILD}")


def _check_kernels_for(name: str, t: Tensor) -> None:
    """A CUDA input on a GPU this build has no kernel for: a clear error before any launch."""
    if t.is_cuda:
        problem = _cuda_kernel_problem(t.device.index if t.device.index is not None
                                       else torch.cuda.current_device())
        if problem is not None:
            raise RuntimeError(f"{name} is on {t.device}, but {problem}")


# CPU kernel levels, lowest first (the names of torch.backends.cpu.get_cpu_capability()).
CPU_CAPABILITIES = ("default", "avx2", "avx512")


def cpu_capability() -> str:
    """The instruction-set level the CPU kernels run at: ``"default"``, ``"avx2"`` or ``"avx512"``.

    The extension carries every CPU kernel at each level (baseline x86-64; AVX2 + FMA; AVX-512
    F/BW/VL/DQ) and picks, at import, the best this CPU supports (cpuid, never the build
    machine's), lowered by ``ATEN_CPU_CAPABILITY`` (torch's own override) and by
    ``FASTIML_CPU_CAPABILITY``. Results agree across levels to the last bits of an exponential
    (README, "CPU levels").
    """
    return _C.cpu_capability()


def supported_cpu_capabilities() -> Tuple[str, ...]:
    """The CPU kernel levels this machine can run, lowest first."""
    best = _C.best_cpu_capability()
    return CPU_CAPABILITIES[:CPU_CAPABILITIES.index(best) + 1]


def set_cpu_capability(level: str) -> None:
    """Runs the CPU kernels at ``level`` from the next call on (any supported level, e.g. to
    compare levels in one process); ``ValueError`` if the name is unknown or the CPU lacks it."""
    if not isinstance(level, str):
        raise TypeError(f"level must be a str, one of {CPU_CAPABILITIES}, "
                        f"got {type(level).__name__}")
    _C.set_cpu_capability(level.lower())


def _initial_cpu_capability() -> str:
    """The level at import: the CPU's best, capped by torch's ATEN_CPU_CAPABILITY (an unknown or
    non-x86 torch level counts as "default") and lowered by FASTIML_CPU_CAPABILITY, which must
    name a level this CPU supports."""
    supported = supported_cpu_capabilities()
    level = supported[-1]
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        torch_level = torch.backends.cpu.get_cpu_capability().lower()
        torch_level = next((c for c in reversed(CPU_CAPABILITIES) if torch_level.startswith(c)),
                           "default")
        level = min(level, torch_level, key=CPU_CAPABILITIES.index)
    requested = os.environ.get("FASTIML_CPU_CAPABILITY", "").strip().lower()
    if requested:
        if requested not in CPU_CAPABILITIES:
            raise ValueError(f"FASTIML_CPU_CAPABILITY must be one of {CPU_CAPABILITIES}, "
                             f"got {requested!r}")
        if requested not in supported:
            raise ValueError(f"FASTIML_CPU_CAPABILITY={requested!r} is not supported on this CPU "
                             f"(it runs at most {supported[-1]!r}); it may only lower the level")
        level = requested
    return level


set_cpu_capability(_initial_cpu_capability())


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_real(x) -> bool:
    """A Python / NumPy real number; bool is not one here (True would pass as 1)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _check_features(name: str, x, rows_name: str = "N") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{rows_name}, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _check_kernels_for(name, x)


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

def _check_pair_sets(q, k, q_label, k_label, q_group, k_group, tau, exclude_self,
                     ignore_index) -> bool:
    """The row / column set arguments of pair_stats and pair_softplus; returns whether this is
    self-contrast (k is None, or q itself with q's labels and groups)."""
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
    if not _is_real(tau) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite real number > 0 (not a bool), got {tau!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if exclude_self and not self_contrast and k.shape[0] != n:
        raise ValueError(f"exclude_self needs q and k to be the same set (N == M), got "
                         f"N={n}, M={k.shape[0]}")
    return self_contrast


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
            ``k_label is q_label`` and ``k_group is q_group``) means self-contrast, which
            returns one gradient; on the CPU it uses the symmetry of the problem (about half
            the work); on CUDA it runs the general dq and dk passes with k = q (deterministic
            cross-block sums of the mirrored tiles need partial buffers; see the README).
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
    self_contrast = _check_pair_sets(q, k, q_label, k_label, q_group, k_group, tau,
                                     exclude_self, ignore_index)
    if denominator not in ("all", "negatives"):
        raise ValueError(f"denominator must be 'all' or 'negatives', got {denominator!r}")
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


# ---------------------------------------------------------------------------------------------
# contour_mine, contour_band
# ---------------------------------------------------------------------------------------------

_MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float64, torch.float16,
                torch.bfloat16)


def _check_mask(mask, valid: Optional[Tensor]) -> Tensor:
    """Validates a B x H x W (or B x 1 x H x W) mask and returns it as B x H x W."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"mask must be [B, H, W] (or [B, 1, H, W]), got shape "
                         f"{tuple(mask.shape)}")
    _check_kernels_for("mask", mask)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"mask must be bool, uint8 (0/1 or 0/255) or float in [0, 1], got "
                        f"{mask.dtype}")
    # One reduction pass each (the kernels read every byte anyway; no temporaries here).
    if mask.numel() and mask.dtype == torch.uint8:
        # Seen as int8, exactly 0, 1 and 255 (-1) lie in [-1, 1].
        low, high = torch.aminmax(mask.view(torch.int8))
        if not (int(low) >= -1 and int(high) <= 1):
            raise ValueError("mask of dtype uint8 must hold only 0/1 or 0/255 values")
    elif mask.numel() and mask.dtype.is_floating_point:
        low, high = torch.aminmax(mask)  # NaN propagates, and fails both comparisons
        if not (float(low) >= 0 and float(high) <= 1):
            raise ValueError("a float mask must hold values in [0, 1] (no NaN)")
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
            raise TypeError("valid must be a bool Tensor")
        if valid.dim() == 4 and valid.shape[1] == 1:
            valid = valid[:, 0]
        if valid.shape != mask.shape or valid.device != mask.device:
            raise ValueError(f"valid must have mask's shape {tuple(mask.shape)} and device, got "
                             f"{tuple(valid.shape)} on {valid.device}")
    return mask, valid


def contour_mine(mask: Tensor, patch: int, *, lo: float = 0.0, hi: float = 1.0,
                 valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Classifies the p x p cells of a mask as authentic, tampered or contour (NCL's patches).

    Args:
        mask: Tensor[B, H, W] (or [B, 1, H, W]): bool, uint8 with 0/1 or 0/255 values (any
            non-zero is tampered), or float in [0, 1] (soft: the value is the tampered weight).
            Read in its own dtype: no float copy is made.
        patch: cell size p > 0. H and W need not be multiples of p: the last cell is partial.
        lo, hi: class thresholds, 0 <= lo < hi <= 1.
        valid: optional bool Tensor like mask; pixels outside it (zero padding) are ignored.

    Returns:
        ``frac`` float32 Tensor[B, ceil(H/p), ceil(W/p)]: tampered fraction of the valid pixels
        of each cell (0 for a cell without any); ``klass`` int8 Tensor of the same shape: 0
        authentic (frac <= lo), 1 tampered (frac >= hi), 2 contour (in between), -1 no valid
        pixel. Not differentiable. Deterministic.
    """
    mask, valid = _check_mask(mask, valid)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"patch must be an int > 0, got {patch!r}")
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    return torch.ops.fastiml.contour_mine(mask, patch, float(lo), float(hi), valid)


def contour_band(mask: Tensor, radius: int, *, valid: Optional[Tensor] = None) -> Tensor:
    """Pixels within ``radius`` (Chebyshev distance) of the tampered/authentic boundary.

    ``band[b, y, x]`` is True when the pixel is valid and the (2r+1) x (2r+1) window around it
    holds both a tampered and an authentic valid pixel (float masks split at 0.5). Returns a
    bool Tensor[B, H, W]; all False for radius 0. Used by pixel-level NCL and by metrics that
    leave out the boundary. Not differentiable. Deterministic.
    """
    mask, valid = _check_mask(mask, valid)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    return torch.ops.fastiml.contour_band(mask, radius, valid)


@torch.library.register_fake("fastiml::contour_mine")
def _contour_mine_fake(mask, patch, lo, hi, valid):
    shape = (mask.shape[0], -(-mask.shape[1] // patch), -(-mask.shape[2] // patch))
    return mask.new_empty(shape, dtype=torch.float32), mask.new_empty(shape, dtype=torch.int8)


@torch.library.register_fake("fastiml::contour_band")
def _contour_band_fake(mask, radius, valid):
    return mask.new_empty(mask.shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# pivot_consistency
# ---------------------------------------------------------------------------------------------

def pivot_consistency(logit_a: Tensor, logit_b: Tensor, klass: Tensor, patch: int, *,
                      weight_contour: float = 1.0, weight_other: float = 0.0) -> Tensor:
    """NCL's pivot-consistent loss: weighted mean symmetric KL between the two branches.

    Per pixel, ``J = KL(pa || pb) + KL(pb || pa)`` for Bernoulli(sigmoid(a)), Bernoulli(sigmoid(b)),
    which equals ``(sigmoid(a) - sigmoid(b)) * (a - b)`` exactly (finite for any logits). A pixel
    weighs ``weight_contour`` when its patch ``klass[b, y // p, x // p]`` is contour (2),
    ``weight_other`` when authentic/tampered, 0 when padding (-1). Loss = sum(w J) / sum(w), or 0
    when sum(w) = 0.

    Args:
        logit_a, logit_b: Tensor[B, 1, H, W] logits (float32/float16/bfloat16/float64).
        klass: int8 Tensor[B, ceil(H/p), ceil(W/p)] from :func:`contour_mine`.
        patch: p, the cell size klass was mined with, in pixels of the logit maps.

    Returns a scalar float32 Tensor (float64 for float64 logits); gradients in the logits'
    dtype, closed form. Reads klass by index: no upsampled mask is made. Deterministic.
    """
    for name, x in (("logit_a", logit_a), ("logit_b", logit_b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"{name} must be [B, 1, H, W], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if logit_b.shape != logit_a.shape or logit_b.dtype != logit_a.dtype:
        raise ValueError(f"logit_b must match logit_a ({tuple(logit_a.shape)}, {logit_a.dtype}), "
                         f"got {tuple(logit_b.shape)}, {logit_b.dtype}")
    if logit_b.device != logit_a.device:
        raise ValueError(f"logit_b must be on {logit_a.device}, got {logit_b.device}")
    _check_kernels_for("logit_a", logit_a)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"patch must be an int > 0, got {patch!r}")
    b, _, h, w = logit_a.shape
    grid = (b, -(-h // patch), -(-w // patch))
    if not isinstance(klass, Tensor) or klass.dtype != torch.int8:
        raise TypeError("klass must be an int8 Tensor (from contour_mine)")
    if tuple(klass.shape) != grid or klass.device != logit_a.device:
        raise ValueError(f"klass must have shape {list(grid)} (B, ceil(H/patch), ceil(W/patch)) "
                         f"on {logit_a.device}, got {list(klass.shape)} on {klass.device}")
    for name, weight in (("weight_contour", weight_contour), ("weight_other", weight_other)):
        if not _is_real(weight) or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name} must be a finite real number >= 0, got {weight!r}")
    return torch.ops.fastiml.pivot_consistency(logit_a, logit_b, klass, patch,
                                               float(weight_contour), float(weight_other))


@torch.library.register_fake("fastiml::pivot_consistency")
def _pivot_fake(logit_a, logit_b, klass, patch, weight_contour, weight_other):
    return logit_a.new_empty((), dtype=_stat_dtype(logit_a.dtype))


@torch.library.register_fake("fastiml::pivot_consistency_backward")
def _pivot_backward_fake(grad, logit_a, logit_b, klass, patch, weight_contour, weight_other):
    return torch.empty_like(logit_a), torch.empty_like(logit_b)


def _pivot_setup_context(ctx, inputs, output):
    logit_a, logit_b, klass, patch, weight_contour, weight_other = inputs
    ctx.save_for_backward(logit_a, logit_b, klass)
    ctx.args = (patch, weight_contour, weight_other)


def _pivot_backward(ctx, grad):
    logit_a, logit_b, klass = ctx.saved_tensors
    grad_a, grad_b = torch.ops.fastiml.pivot_consistency_backward(grad, logit_a, logit_b, klass,
                                                                  *ctx.args)
    return grad_a, grad_b, None, None, None, None


torch.library.register_autograd("fastiml::pivot_consistency", _pivot_backward,
                                setup_context=_pivot_setup_context)


# ---------------------------------------------------------------------------------------------
# pair_softplus (NT-Xent's positive pairs, DESIGN 9)
# ---------------------------------------------------------------------------------------------

def pair_softplus(q: Tensor, k: Optional[Tensor], q_label: Tensor, k_label: Optional[Tensor],
                  q_group: Optional[Tensor] = None, k_group: Optional[Tensor] = None, *,
                  lse: Tensor, tau: float = 0.1, exclude_self: bool = False,
                  ignore_index: int = -1) -> Tuple[Tensor, Tensor]:
    """NT-Xent's positive-pair sum, fused: ``total_i = sum_{j in P(i)} softplus(lse_i - s_ij)``.

    Rows, columns, positives and their arguments are those of :func:`pair_stats` (``P(i)``: the
    counted columns with row i's label). ``lse`` is the negatives' log-sum-exp of each row,
    ``pair_stats(..., denominator="negatives")``'s first output, so that
    ``softplus(lse_i - s_ij) = -log(e^{s_ij} / (e^{s_ij} + sum_{k in N(i)} e^{s_ik}))``.

    Args:
        q, k, q_label, k_label, q_group, k_group, tau, exclude_self, ignore_index: as
            :func:`pair_stats`.
        lse: Tensor[N], float32 (float64 for float64 inputs); -inf (no negative) makes the
            row's sums 0.

    Returns:
        ``total`` Tensor[N], differentiable in ``q``, ``k`` and ``lse``
        (``d total_i / d lse_i = weight_i``); ``weight`` Tensor[N], the sum over positives of
        ``sigmoid(lse_i - s_ij)``, not differentiable. float32 (float64 for float64 inputs).

    Only tiles that can hold a positive pair are computed; memory O((N + M) D) plus fixed
    tiles. The CPU kernel is deterministic for a given number of threads.
    """
    self_contrast = _check_pair_sets(q, k, q_label, k_label, q_group, k_group, tau, exclude_self,
                                     ignore_index)
    stat = _stat_dtype(q.dtype)
    if not isinstance(lse, Tensor) or lse.shape != (q.shape[0],) or lse.dtype != stat or \
            lse.device != q.device:
        got = (f"{lse.dtype} {tuple(lse.shape)} on {lse.device}" if isinstance(lse, Tensor)
               else type(lse).__name__)
        raise ValueError(f"lse must be a {stat} Tensor[{q.shape[0]}] on {q.device}, got {got}")
    as_long = lambda t: None if t is None else t.long()  # noqa: E731
    return torch.ops.fastiml.pair_softplus(
        q, None if self_contrast else k, q_label.long(),
        None if self_contrast else k_label.long(), as_long(q_group),
        None if self_contrast else as_long(k_group), lse, float(tau), bool(exclude_self),
        int(ignore_index))


@torch.library.register_fake("fastiml::pair_softplus")
def _pair_softplus_fake(q, k, q_label, k_label, q_group, k_group, lse, tau, exclude_self,
                        ignore_index):
    n, dtype = q.shape[0], _stat_dtype(q.dtype)
    return q.new_empty(n, dtype=dtype), q.new_empty(n, dtype=dtype)


@torch.library.register_fake("fastiml::pair_softplus_backward")
def _pair_softplus_backward_fake(grad_total, q, k, q_label, k_label, q_group, k_group, lse, tau,
                                 exclude_self, ignore_index, q_needs_grad, k_needs_grad):
    grad_q = torch.empty_like(q) if q_needs_grad else q.new_empty(0)
    grad_k = torch.empty_like(k) if (k is not None and k_needs_grad) else q.new_empty(0)
    return grad_q, grad_k


def _pair_softplus_setup_context(ctx, inputs, output):
    q, k, q_label, k_label, q_group, k_group, lse, tau, exclude_self, ignore_index = inputs
    _, weight = output
    ctx.mark_non_differentiable(weight)
    ctx.save_for_backward(q, k, q_label, k_label, q_group, k_group, lse, weight)
    ctx.args = (tau, exclude_self, ignore_index)


def _pair_softplus_backward(ctx, grad_total, _grad_weight):
    q, k, q_label, k_label, q_group, k_group, lse, weight = ctx.saved_tensors
    q_needs, k_needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and k is not None
    grad_q = grad_k = grad_lse = None
    if grad_total is None:
        grad_total = torch.zeros_like(lse)
    if q_needs or k_needs:
        grad_q, grad_k = torch.ops.fastiml.pair_softplus_backward(
            grad_total, q, k, q_label, k_label, q_group, k_group, lse, *ctx.args, q_needs,
            k_needs)
    if ctx.needs_input_grad[6]:
        grad_lse = grad_total * weight
    return (grad_q if q_needs else None, grad_k if k_needs else None, None, None, None, None,
            grad_lse, None, None, None)


torch.library.register_autograd("fastiml::pair_softplus", _pair_softplus_backward,
                                setup_context=_pair_softplus_setup_context)


# ---------------------------------------------------------------------------------------------
# clip_lse, siglip_loss (CLIP both ways in one pass, SigLIP; DESIGN 11)
# ---------------------------------------------------------------------------------------------

def _check_row_column_features(q, k) -> None:
    _check_features("q", q)
    _check_features("k", k, "M")
    if k.shape[1] != q.shape[1] or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must be [M, {q.shape[1]}] with q's dtype {q.dtype} on {q.device}, "
                         f"got {tuple(k.shape)} {k.dtype} on {k.device}")


def learned_scalar(name: str, x, like: Tensor) -> Tensor:
    """``x`` (a real number, or a one-element floating Tensor, learned or not) as the 0-dim
    Tensor the ops take: ``like``'s statistics dtype (float32; float64 for float64 features) on
    its device. A Tensor keeps its autograd graph (the conversion is differentiable)."""
    dtype = _stat_dtype(like.dtype)
    if _is_real(x):
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x!r}")
        return torch.tensor(float(x), dtype=dtype, device=like.device)
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real number or a floating Tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(x.shape)}")
    return x.reshape(()).to(device=like.device, dtype=dtype)


def clip_lse(q: Tensor, k: Tensor, scale) -> Tuple[Tensor, Tensor, Tensor]:
    """Row and column log-sum-exps of ``S = scale * q k^T`` in one pass over its tiles.

    ``row_lse[i] = logsumexp_j S_ij``, ``col_lse[j] = logsumexp_i S_ij`` and ``diag[i] = S_ii``:
    both directions of CLIP's cross-entropy (``row_lse[i] - diag[i]`` image to text,
    ``col_lse[j] - diag[j]`` text to image) without the N x M logits (``diag`` comes from the
    same tile products as the log-sum-exps: a pair alone in its row gives exactly 0). Each
    direction keeps its own running maximum (rows per row; columns per column within each
    thread's rows, merged in a fixed order), so any scale and any feature norms are safe.

    Args:
        q: Tensor[N, D] rows (float32/float16/bfloat16/float64).
        k: Tensor[M, D] columns, same dtype and device.
        scale: a real number or a one-element Tensor (learned: its gradient flows), applied to
            the float32 (float64) products, so half features are not rounded by it.

    Returns ``(row_lse Tensor[N], col_lse Tensor[M], diag Tensor[min(N, M)])``, float32
    (float64 for float64 inputs), differentiable in ``q``, ``k`` and ``scale``: the backward
    recomputes each tile once and gives all three gradients from
    ``G = g_row e^(S - row_lse) + g_col e^(S - col_lse) + g_diag [i == j]`` (three products per
    tile). Memory O((N + M) D) plus fixed tiles (and, in the CPU backward, a 4096 x D buffer
    per thread). CPU: deterministic for a given number of threads. CUDA: the same sums from
    ATen ops on chunks of rows (O(chunk M) memory), not a hand-written kernel.
    """
    _check_row_column_features(q, k)
    return torch.ops.fastiml.clip_lse(q, k, learned_scalar("scale", scale, q))


@torch.library.register_fake("fastiml::clip_lse")
def _clip_lse_fake(q, k, scale):
    dtype = _stat_dtype(q.dtype)
    return (q.new_empty(q.shape[0], dtype=dtype), q.new_empty(k.shape[0], dtype=dtype),
            q.new_empty(min(q.shape[0], k.shape[0]), dtype=dtype))


@torch.library.register_fake("fastiml::clip_lse_backward")
def _clip_lse_backward_fake(grad_row, grad_col, grad_diag, q, k, scale, row_lse, col_lse,
                            q_needs_grad, k_needs_grad, scale_needs_grad):
    return (torch.empty_like(q) if q_needs_grad else q.new_empty(0),
            torch.empty_like(k) if k_needs_grad else k.new_empty(0),
            scale.new_empty(()) if scale_needs_grad else scale.new_empty(0))


def _clip_lse_setup_context(ctx, inputs, output):
    q, k, scale = inputs
    row_lse, col_lse, diag = output
    ctx.save_for_backward(q, k, scale, row_lse, col_lse)
    ctx.diag_len = diag.shape[0]


def _clip_lse_backward(ctx, grad_row, grad_col, grad_diag):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs):
        return None, None, None
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
    grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
    grad_diag = row_lse.new_zeros(ctx.diag_len) if grad_diag is None else grad_diag
    grads = torch.ops.fastiml.clip_lse_backward(grad_row, grad_col, grad_diag, q, k, scale,
                                                row_lse, col_lse, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


torch.library.register_autograd("fastiml::clip_lse", _clip_lse_backward,
                                setup_context=_clip_lse_setup_context)


def siglip_loss(q: Tensor, k: Tensor, scale, bias, *, offset: int = 0) -> Tensor:
    """SigLIP's pair loss summed over every pair, fused:
    ``sum_ij softplus(-z_ij (scale <q_i, k_j> + bias))`` (= ``-log sigmoid(z_ij logit_ij)``),
    ``z_ij = +1`` for ``j == i + offset``, -1 otherwise.

    Args:
        q: Tensor[N, D] rows (float32/float16/bfloat16/float64).
        k: Tensor[M, D] columns, same dtype and device, M >= N.
        scale, bias: real numbers or one-element Tensors (learned: their gradients flow).
        offset: row i's positive is column ``i + offset`` (``rank * N`` against columns
            gathered from every rank), 0 <= offset <= M - N.

    Returns the scalar sum, float32 (float64 for float64 inputs), differentiable in ``q``,
    ``k``, ``scale`` and ``bias``. One pass over the tiles of ``q k^T`` with an O(1) epilogue
    per pair (no log-sum-exp: the loss is a sum of pair terms); the backward recomputes each
    tile once for all four gradients (three products per tile). Memory O((N + M) D) plus
    fixed tiles (and, in the CPU backward, a 4096 x D buffer per thread). CPU: deterministic
    for a given number of threads; CUDA: ATen ops on chunks of rows (O(chunk M) memory).
    """
    _check_row_column_features(q, k)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an int, got {offset!r}")
    if not 0 <= offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"offset must be in [0, M - N] = [0, {k.shape[0] - q.shape[0]}] (row i's "
                         f"positive is column i + offset), got {offset}")
    return torch.ops.fastiml.siglip_loss(q, k, learned_scalar("scale", scale, q),
                                         learned_scalar("bias", bias, q), int(offset))


@torch.library.register_fake("fastiml::siglip_loss")
def _siglip_loss_fake(q, k, scale, bias, offset):
    return scale.new_empty(())


@torch.library.register_fake("fastiml::siglip_loss_backward")
def _siglip_loss_backward_fake(grad, q, k, scale, bias, offset, q_needs_grad, k_needs_grad,
                               scalars_need_grad):
    return (torch.empty_like(q) if q_needs_grad else q.new_empty(0),
            torch.empty_like(k) if k_needs_grad else k.new_empty(0),
            scale.new_empty(()) if scalars_need_grad else scale.new_empty(0),
            bias.new_empty(()) if scalars_need_grad else bias.new_empty(0))


def _siglip_loss_setup_context(ctx, inputs, output):
    q, k, scale, bias, offset = inputs
    ctx.save_for_backward(q, k, scale, bias)
    ctx.offset = offset


def _siglip_loss_backward(ctx, grad):
    q, k, scale, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if not any(needs):
        return None, None, None, None, None
    grads = torch.ops.fastiml.siglip_loss_backward(grad, q, k, scale, bias, ctx.offset,
                                                   needs[0], needs[1], needs[2] or needs[3])
    return (*(g if need else None for g, need in zip(grads, needs)), None)


torch.library.register_autograd("fastiml::siglip_loss", _siglip_loss_backward,
                                setup_context=_siglip_loss_setup_context)


def row_lse(q: Tensor, k: Tensor, scale) -> Tensor:
    """Row log-sum-exps of ``S = scale * q k^T``: ``lse[i] = logsumexp_j S_ij``, for keys that
    are many and need no gradient (MoCo's memory bank: B = 512 rows against K = 65,536).

    The forward is FlashAttention's with the keys as values: each row's online log-sum-exp
    and, when a gradient will be needed, ``mean[i] = sum_j softmax_j(S_i)_j k_j`` -- two
    products per tile. The gradient of ``lse`` is then elementwise: ``d lse_i / d q_i = scale
    mean_i``, ``d lse_i / d scale = <q_i, mean_i>``, so the backward reads neither ``k`` nor a
    product (``pair_stats`` and ``clip_lse`` recompute every tile: three products more). A
    ``k`` that requires grad gets it through ``clip_lse``'s backward (one recompute).

    Args:
        q: Tensor[N, D] rows (float32/float16/bfloat16/float64).
        k: Tensor[M, D] keys, same dtype and device; M = 0 gives ``-inf``.
        scale: a real number or a one-element Tensor (learned: its gradient flows).

    Returns ``lse``, Tensor[N], float32 (float64 for float64 inputs). Memory O((N + M) D)
    plus fixed tiles and ``mean`` ([N, D], saved for the backward); never N x M. CPU:
    deterministic for a given number of threads (the columns are split among threads when
    the rows are few, the parts merged in a fixed order). CUDA: ATen ops on chunks of rows.
    """
    _check_row_column_features(q, k)
    scale = learned_scalar("scale", scale, q)
    if not (torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or scale.requires_grad)):
        return torch.ops.fastiml.row_lse(q, k, scale, False)[0]  # no backward: no mean
    return _RowLse.apply(q, k, scale)


class _RowLse(torch.autograd.Function):
    # An autograd.Function, not register_autograd: the forward decides from requires_grad
    # whether to form the mean, which a custom op's autograd rule cannot see.
    @staticmethod
    def forward(ctx, q, k, scale):
        with_mean = (q.requires_grad or scale.requires_grad) and not k.requires_grad
        lse, mean = torch.ops.fastiml.row_lse(q, k, scale, with_mean)
        ctx.save_for_backward(q, k if k.requires_grad else None, scale, lse,
                              mean if with_mean else None)
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, lse, mean = ctx.saved_tensors
        need_q, need_k, need_scale = ctx.needs_input_grad
        if mean is None:  # k takes a gradient: clip_lse's backward, rows only
            zeros = lambda n: lse.new_zeros(n)  # noqa: E731
            no_columns = lse.new_full((k.shape[0],), math.inf)  # e^(S - inf) = 0
            grads = torch.ops.fastiml.clip_lse_backward(
                grad, zeros(k.shape[0]), zeros(min(q.shape[0], k.shape[0])), q, k, scale, lse,
                no_columns, need_q, need_k, need_scale)
            return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
        grad_q = (grad.unsqueeze(1) * scale * mean).to(q.dtype) if need_q else None
        grad_scale = (grad * (q.to(mean.dtype) * mean).sum(1)).sum() if need_scale else None
        return grad_q, None, grad_scale


@torch.library.register_fake("fastiml::row_lse")
def _row_lse_fake(q, k, scale, with_mean):
    dtype = _stat_dtype(q.dtype)
    return (q.new_empty(q.shape[0], dtype=dtype),
            q.new_empty((q.shape[0], q.shape[1]) if with_mean else (0,), dtype=dtype))
