"""Drop-ins with lightly's signatures (lightly 1.5.26): ``from fastiml.losses.lightly import
NTXentLoss`` (or ``DCLLoss``, ``DCLWLoss``), one import line (DESIGN 11).

Same constructors, calls and values as ``lightly.loss``; fused through
:func:`fastiml.ops.pair_stats` (two views) and :func:`fastiml.ops.row_lse` (memory bank), so no
B x B (or B x K) logits are formed.

* Two views, no memory bank: the 2B rows ``[out0; out1]`` contrasted with each other (self
  mode, ``exclude_self``), row i's positive its other view (labels ``arange(B)`` twice), the
  log-sum-exp over its negatives (``denominator="negatives"``). ``DCLLoss`` is
  ``lse_neg - positive``; ``NTXentLoss``'s cross-entropy is
  ``log(1 + e^(lse_neg - positive))``, which is 0 exactly for a row with no negative and does
  not cancel when the positive dominates (``lse_all - positive`` would do both).
* Memory bank (MoCo): row i of ``out0`` against its positive ``out1[i]`` and the K bank
  entries: the bank's log-sum-exp from ``row_lse(out0, bank)``, the positive's logit
  ``<out0_i, out1_i> / T`` apart, the same cross-entropy.
* A negative temperature T (lightly allows it): ``s / T = <-q, k> / |T|``, so the rows are
  negated and ``tau = |T|`` (self mode then runs as q = -z against k = z).
"""
import math
import numbers
import warnings
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch import distributed as torch_dist
from torch.nn import functional as F

from fastiml import ops
from fastiml.losses.functional import NO_IGNORE, gather_rows, merge_stats, world

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "MemoryBank", "negative_mises_fisher_weights"]


def _check_temperature(temperature, loss_name: str, minimum: float = 0.0) -> float:
    """A finite, non-zero real temperature of either sign with ``|T| >= minimum``."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{loss_name}: temperature must be a real number, got "
                        f"{type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature == 0 or abs(temperature) < minimum:
        raise ValueError(f"{loss_name}: temperature must be finite and non-zero with "
                         f"abs(temperature) >= {minimum:g} (negative values are allowed), "
                         f"got {temperature}")
    return temperature


def _check_gather(gather_distributed: bool) -> None:
    # lightly's check, called once (its tests count the calls of torch.distributed.is_available).
    if gather_distributed and not torch_dist.is_available():
        raise ValueError("gather_distributed is True but torch.distributed is not available; "
                         "set gather_distributed=False or install a torch with distributed "
                         "support")


def _normalized_views(out0: Tensor, out1: Tensor) -> Tuple[Tensor, Tensor]:
    """``out0`` and ``out1`` [B, D], L2-normalised per row, in their common dtype."""
    for name, x in (("out0", out0), ("out1", out1)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 2 or not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating Tensor [batch_size, embedding_size], "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
    if out1.shape != out0.shape or out1.device != out0.device:
        raise ValueError(f"out1 must match out0's shape {tuple(out0.shape)} and device "
                         f"{out0.device}, got {tuple(out1.shape)} on {out1.device}")
    dtype = torch.promote_types(out0.dtype, out1.dtype)
    return F.normalize(out0.to(dtype), dim=1), F.normalize(out1.to(dtype), dim=1)


def _signed_rows(rows: Tensor, temperature: float) -> Tuple[Tensor, float]:
    """Rows and tau > 0 with ``<rows_i, k_j> / tau == <x_i, k_j> / temperature``."""
    return (rows if temperature > 0 else -rows), abs(temperature)


def cross_entropy(lse_negatives: Tensor, positive: Tensor) -> Tensor:
    """``-log(e^p / (e^p + e^lse_neg)) = log(1 + e^(lse_neg - p))``, elementwise (exact:
    ``logaddexp``, not softplus's linear cut-off)."""
    x = lse_negatives - positive
    return torch.logaddexp(x, torch.zeros_like(x))


def two_view_stats(out0: Tensor, out1: Tensor, temperature: float, *,
                   gather: bool) -> Tuple[Tensor, Tensor]:
    """Statistics of the 2B rows ``[out0; out1]`` (normalised), each against every other row.

    Row i's positive is its other view, its negatives every other row. With ``gather`` under
    torch.distributed, the columns are every rank's rows (gathered with their gradients, as
    lightly's ``gather_distributed``); the rows stay local.
    Returns ``(lse_neg, positive)``, Tensor[2B] each: the log-sum-exp over the negatives (-inf
    where there is none) and the positive's logit ``<z_i, z_partner> / temperature``.
    """
    z = torch.cat([out0, out1])
    b = out0.shape[0]
    rank, size = world()
    gather = gather and size > 1
    labels = torch.arange(b, device=z.device).repeat(2) + (rank * b if gather else 0)
    q, tau = _signed_rows(z, temperature)
    # Self mode where it applies (half the work); a negated q is another set: general mode.
    k = None if q is z else z
    stats = ops.pair_stats(q, k, labels, None if k is None else labels, tau=tau,
                           exclude_self=True, denominator="negatives", ignore_index=NO_IGNORE)
    if gather:
        other_rows, other_labels, _ = gather_rows(z, labels, None)
        stats = merge_stats(stats, ops.pair_stats(q, other_rows, labels, other_labels, tau=tau,
                                                  denominator="negatives",
                                                  ignore_index=NO_IGNORE))
    lse, positive, _ = stats
    return lse, positive


# --------------------------------------------------------------------------- memory bank

def _bank_size(size) -> Tuple[int, ...]:
    """lightly's ``memory_bank_size``: an int K, or a (K,) / (K, dim) sequence, entries >= 0."""
    is_int = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)  # noqa: E731
    if is_int(size):
        sizes = (int(size),)
    elif isinstance(size, Sequence) and len(size) in (1, 2) and all(map(is_int, size)):
        sizes = tuple(int(x) for x in size)
    else:
        raise TypeError(f"memory_bank_size must be an int or a (num_features, dim) tuple of "
                        f"ints, got {size!r}")
    if any(x < 0 for x in sizes):
        raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
    return sizes


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` (as ``NTXentLoss`` uses it), without its per-step copy.

    A FIFO of ``size[0]`` rows: initialised as lightly does (``torch.randn`` from the global
    RNG, rows L2-normalised, float32 -- at construction for a ``(K, dim)`` size, at the first
    batch for an int K, with lightly's warning), then each update writes the batch (detached)
    at the pointer; a batch that reaches the end fills it, the rest of the batch is dropped,
    and the pointer returns to 0.

    lightly copies the whole bank every step (the loss reads the copy, the update writes the
    bank). Here the update is written in place: the loss (:func:`bank_loss`, through
    :func:`fastiml.ops.row_lse`) has read the bank by then, and its backward needs only what
    its forward saved, never the bank.

    ``bank`` (Tensor[K, dim], or lightly's empty Tensor[K] before the first batch) and
    ``bank_ptr`` (int64 Tensor[1]) read and write the state as lightly's attributes do. The
    bank is a non-persistent buffer (not in ``state_dict``, as lightly's): ``.to()`` moves and
    casts it.
    """

    def __init__(self, size: Union[int, Sequence[int]] = 65536, gather_distributed: bool = False):
        super().__init__()
        self.size = _bank_size(size)
        self.gather_distributed = gather_distributed
        self.register_buffer("_bank", torch.empty(self.size, dtype=torch.float), persistent=False)
        self._ptr = 0  # a Python int: no device sync per step
        if isinstance(size, numbers.Integral) and self.size[0] > 0:
            warnings.warn(f"Memory bank size 'size={size}' does not specify feature dimension. "
                          "It is recommended to set the feature dimension with 'size=(n, dim)' "
                          "when creating the memory bank. Distributed training might fail if "
                          "the feature dimension is not set.", UserWarning, stacklevel=3)
        elif len(self.size) > 1:
            self._init_bank(self.size)

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    @property
    def bank(self) -> Tensor:
        return self._bank

    @bank.setter
    def bank(self, value: Tensor) -> None:
        if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] != self.size[0]:
            raise ValueError(f"bank must be a Tensor [{self.size[0]}, dim], got "
                             f"{tuple(value.shape) if isinstance(value, Tensor) else value!r}")
        self._bank = value

    @property
    def bank_ptr(self) -> Tensor:
        return torch.tensor([self._ptr], dtype=torch.long, device=self._bank.device)

    @bank_ptr.setter
    def bank_ptr(self, value) -> None:
        ptr = int(value)
        if not 0 <= ptr < max(self.size[0], 1):
            raise ValueError(f"bank_ptr must be in [0, {self.size[0]}), got {ptr}")
        self._ptr = ptr

    @torch.no_grad()
    def _init_bank(self, size: Tuple[int, ...]) -> None:
        # lightly's draw, to the bit: same global-RNG stream, same normalisation.
        self._bank = F.normalize(torch.randn(size).type_as(self._bank), dim=-1)
        self._ptr = 0

    def negatives(self, rows: Tensor) -> Tensor:
        """The bank before this step's update, Tensor[K, dim] (initialised from ``rows``'s
        dim at the first call for an int size)."""
        if self._bank.dim() == 1:
            self._init_bank((*self.size, rows.shape[1]))
        if self._bank.shape[1] != rows.shape[1]:
            raise ValueError(f"the memory bank holds {self._bank.shape[1]}-dim features "
                             f"(memory_bank_size={self.size}), but the batch has "
                             f"embedding_size {rows.shape[1]}")
        return self._bank

    @torch.no_grad()
    def push(self, batch: Tensor) -> None:
        """Writes ``batch`` (detached; every rank's under ``gather_distributed``) into the FIFO."""
        batch = batch.detach()
        _, size = world()
        if self.gather_distributed and size > 1:  # a collective: every rank, in forward
            parts = [torch.empty_like(batch) for _ in range(size)]
            torch_dist.all_gather(parts, batch.contiguous())
            batch = torch.cat(parts)
        batch = batch.to(self._bank)
        k, ptr = self.size[0], self._ptr
        if ptr + batch.shape[0] >= k:
            self._bank[ptr:] = batch[:k - ptr]
            self._ptr = 0
        else:
            self._bank[ptr:ptr + batch.shape[0]] = batch
            self._ptr = ptr + batch.shape[0]

    def extra_repr(self) -> str:
        return f"size={self.size}, gather_distributed={self.gather_distributed}"


def bank_loss(out0: Tensor, out1: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """MoCo's per-row loss ``logsumexp([s_pos, s_bank]) - s_pos``, Tensor[B], with
    ``s_pos = <out0_i, out1_i> / T`` and ``s_bank = out0_i bank^T / T``: the bank's
    log-sum-exp fused (:func:`fastiml.ops.row_lse`: no B x K logits, two products per tile and
    none in the backward), the positive apart (:func:`cross_entropy`). The bank takes no
    gradient (lightly's is a detached copy).

    The rows and the bank meet in their promoted dtype (a float32 bank with half rows: the rows
    are cast; a float64 run keeps the bank in float64, ``loss.double()``, to avoid a copy).
    """
    dtype = torch.promote_types(out0.dtype, bank.dtype)
    out0, out1 = out0.to(dtype), out1.to(dtype)
    k = bank.detach().to(device=out0.device, dtype=dtype)
    q, tau = _signed_rows(out0, temperature)
    lse_bank = ops.row_lse(q, k, 1.0 / tau)
    positive = (out0 * out1).sum(1).to(lse_bank.dtype) / temperature
    return cross_entropy(lse_bank, positive)


# --------------------------------------------------------------------------------- losses

class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss`` (SimCLR; MoCo with a memory bank), fused.

    Same constructor, call and value as lightly 1.5.26: ``out0``, ``out1`` [B, D] are
    L2-normalised, logits are cosine similarities over ``temperature`` (negative values are
    allowed; ``abs(temperature) < 1e-8`` is a ValueError, as in lightly).

    * ``memory_bank_size`` 0: the mean over the 2B rows of ``[out0; out1]`` of the
      cross-entropy of each row against the 2B - 1 others, its positive the other view. With
      ``gather_distributed`` under torch.distributed, the columns are every rank's rows
      (gathered with gradients).
    * ``memory_bank_size`` K > 0 (an int, or ``(K, dim)``): the mean over the B rows of
      ``out0`` of the cross-entropy against ``[out1_i; bank]`` (positive first), the bank as it
      was before this step. After the loss, when ``out0`` requires grad, ``out1`` (normalised,
      detached; every rank's with ``gather_distributed``) enters the FIFO -- see
      :class:`MemoryBank`, which keeps lightly's initialisation (same RNG draw) and update
      rule, and its ``memory_bank.bank`` / ``memory_bank.bank_ptr`` attributes.

    Memory O((B + K) D): neither the 2B x 2B nor the B x K logits, nor lightly's per-step copy
    of the bank. Returns a scalar: float32 for half inputs (and with the default float32 bank),
    else their dtype. The CPU kernel is deterministic for a given number of threads.
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = _check_temperature(temperature, "NTXentLoss", minimum=1e-8)
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)
        self.gather_distributed = gather_distributed
        _check_gather(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0, out1 = _normalized_views(out0, out1)
        if not self.memory_bank.enabled:
            lse_neg, positive = two_view_stats(out0, out1, self.temperature,
                                               gather=self.gather_distributed)
            return cross_entropy(lse_neg, positive).mean()
        bank = self.memory_bank.negatives(out1)
        loss = bank_loss(out0, out1, bank, self.temperature)
        # lightly updates only when a backward will follow (out0 requires grad).
        if out0.requires_grad:
            self.memory_bank.push(out1)
        return loss.mean()


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCL-W weights: ``2 - B softmax_i(<out0_i, out1_i> / sigma)``, Tensor[B], no
    gradient (computed from detached inputs)."""
    similarity = (out0.detach() * out1.detach()).sum(1) / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss`` (Decoupled Contrastive Learning), fused.

    Same constructor, call and value as lightly 1.5.26: the mean over the 2B rows of
    ``[out0; out1]`` (L2-normalised) of ``-w_i s_i,partner + logsumexp_{j in N(i)} s_ij``,
    ``s = cosine / temperature``, N(i) every row but i and its other view (the positive is
    dropped from the denominator: ``pair_stats(..., denominator="negatives")``). ``w`` is
    ``weight_fn(out0, out1)`` for the rows of ``out0`` and ``weight_fn(out1, out0)`` for those
    of ``out1`` (both normalised; Tensor[B] or anything that broadcasts to it), 1 without
    ``weight_fn``. With ``gather_distributed`` under torch.distributed, the columns are every
    rank's rows (gathered with gradients); the weights use the local rows, as lightly's.

    ``temperature`` may be negative; 0 or a non-finite value is a ValueError (lightly returns
    inf / NaN). Memory O(B D): the 2B x 2B logits are never formed. Returns a scalar: float32
    for half inputs, else their dtype. B = 1 has no negative: -inf, as lightly's.
    """

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = _check_temperature(temperature, type(self).__name__)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be None or a callable (out0, out1) -> Tensor[B], "
                            f"got {type(weight_fn).__name__}")
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_gather(gather_distributed)

    def _weights(self, out0: Tensor, out1: Tensor) -> Tensor:
        w = self.weight_fn(out0, out1)
        w = w if isinstance(w, Tensor) else torch.as_tensor(w, device=out0.device)
        b = out0.shape[0]
        try:
            shape = torch.broadcast_shapes(w.shape, (b,))
        except RuntimeError:
            shape = None
        if shape != (b,):
            raise ValueError(f"weight_fn must return a Tensor[{b}] (batch_size weights), got "
                             f"shape {tuple(w.shape)}")
        return w.expand(b)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0, out1 = _normalized_views(out0, out1)
        lse, positive = two_view_stats(out0, out1, self.temperature,
                                       gather=self.gather_distributed)
        if self.weight_fn:
            positive = positive * torch.cat([self._weights(out0, out1),
                                             self._weights(out1, out0)])
        return (lse - positive).mean()


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss``: :class:`DCLLoss` weighted by
    :func:`negative_mises_fisher_weights` with ``sigma`` (finite, non-zero)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False):
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or \
                not math.isfinite(sigma) or sigma == 0:
            raise ValueError(f"DCLWLoss: sigma must be a finite non-zero real number, "
                             f"got {sigma!r}")
        super().__init__(temperature=temperature,
                         weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed=gather_distributed)
