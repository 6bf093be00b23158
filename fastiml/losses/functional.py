"""Functional forms of the contrastive losses, built on :func:`fastiml.ops.pair_stats`."""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from fastiml import ops

# An ignore_index no real label takes, for losses whose originals have no ignore label (finding
# an unused value from the data would cost a device sync).
NO_IGNORE = -(2 ** 63)


def reduce_loss(per_row: Tensor, keep: Tensor, reduction: str) -> Tensor:
    """Reduces per-row losses over the rows in ``keep``.

    ``"mean"`` over kept rows (0, still connected to the graph, when none is kept), ``"sum"``,
    or ``"none"`` (per-row values with 0 at rows not kept).
    """
    per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge_stats(a, b):
    """Statistics of one row set against the union of two disjoint column sets."""
    (lse_a, mean_a, count_a), (lse_b, mean_b, count_b) = a, b
    both_empty = torch.isinf(lse_a) & torch.isinf(lse_b)
    # logaddexp of two -inf has a NaN gradient: feed it zeros there and select -inf after.
    lse = torch.logaddexp(torch.where(both_empty, 0.0, lse_a), torch.where(both_empty, 0.0, lse_b))
    lse = torch.where(both_empty, lse_a, lse)
    count = count_a + count_b
    mean = (mean_a * count_a + mean_b * count_b) / count.clamp(min=1)
    return lse, mean, count


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of its slice's gradient."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world()[1])]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[world()[0]]


def gather_rows(rows: Tensor, labels: Tensor, groups: Optional[Tensor]):
    """The rows, labels and groups of every other rank (rows keep their gradient)."""
    rank, size = world()
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    if any(int(n) != rows.shape[0] for n in sizes):
        raise ValueError("gathering contrastive rows across ranks needs the same number of rows "
                         f"on every rank, got {[int(n) for n in sizes]}")
    all_rows = _AllGather.apply(rows)
    others = lambda ts: torch.cat([t for r, t in enumerate(ts) if r != rank])  # noqa: E731
    all_labels = [torch.empty_like(labels) for _ in range(size)]
    dist.all_gather(all_labels, labels)
    other_groups = None
    if groups is not None:
        all_groups = [torch.empty_like(groups) for _ in range(size)]
        dist.all_gather(all_groups, groups)
        other_groups = others(all_groups)
    return others(all_rows), others(all_labels), other_groups


def supcon_per_row(features: Tensor, labels: Tensor, groups: Optional[Tensor] = None, *,
                   tau: float, ignore_index: int = -1, gather: bool = False):
    """SupCon over one set contrasted with itself: ``lse_i - pos_mean_i`` per row.

    With ``gather`` under torch.distributed, the columns are every rank's rows (gathered with
    their gradients) while the rows stay local: own rows in self mode, the others' rows as a
    second call, the statistics merged. ``groups`` must then be unique across ranks.
    Returns ``(loss, has_positive)``, both [N]; rows with no positive (or ignored) have
    ``has_positive`` False and a meaningless loss value.
    """
    stats = ops.pair_stats(features, None, labels, None, groups, tau=tau, exclude_self=True,
                           ignore_index=ignore_index)
    if gather and world()[1] > 1:
        other_rows, other_labels, other_groups = gather_rows(features, labels, groups)
        stats = merge_stats(stats, ops.pair_stats(features, other_rows, labels, other_labels,
                                                  groups, other_groups, tau=tau,
                                                  ignore_index=ignore_index))
    lse, pos_mean, pos_count = stats
    has_positive = pos_count > 0
    safe_lse = torch.where(has_positive, lse, torch.zeros_like(lse))
    return safe_lse - pos_mean, has_positive


def mean_across_ranks(total: Tensor, count: Tensor, gather: bool) -> Tensor:
    """``total / count`` where both are sums over this rank's terms.

    Under torch.distributed with ``gather``, returns ``world * total / sum of every rank's
    count``: DDP averages gradients over ranks, so this makes the averaged gradient (and the
    mean of the ranks' losses) that of the single-process mean over the union.
    """
    _, size = world()
    if gather and size > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
        return size * total / count.clamp(min=1)
    return total / count.clamp(min=1)


def flatten_pixels(features: Tensor, labels: Tensor, name: str = "features"):
    """B x D x H x W features and B x H x W labels -> rows [B*H*W, D], labels and image index."""
    if features.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, D, H, W], got shape {tuple(features.shape)}")
    b, _, h, w = features.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels must have shape [B, H, W] = {[b, h, w]} to match {name}, "
                         f"got {list(labels.shape)}")
    rows = features.permute(0, 2, 3, 1).reshape(b * h * w, -1)
    image = torch.arange(b, device=features.device).repeat_interleave(h * w)
    return rows, labels.reshape(-1).long(), image


def pixel_supcon_loss(features: Tensor, labels: Tensor, *, tau: float = 0.1,
                      ignore_index: int = -1, within_image: bool = False,
                      normalize: bool = True, reduction: str = "mean") -> Tensor:
    """SupCon over every pixel of a batch of feature maps (see :class:`PixelSupConLoss`)."""
    check_reduction(reduction)
    rows, flat_labels, image = flatten_pixels(features, labels)
    if normalize:
        rows = torch.nn.functional.normalize(rows, dim=1)
    loss, keep = supcon_per_row(rows, flat_labels, image if within_image else None, tau=tau,
                                ignore_index=ignore_index)
    out = reduce_loss(loss, keep, reduction)
    return out.view(labels.shape) if reduction == "none" else out
