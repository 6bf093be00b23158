"""Functional forms of the contrastive losses, built on :func:`fastiml.ops.pair_stats`."""
from typing import Optional

import torch
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


def supcon_per_row(features: Tensor, labels: Tensor, groups: Optional[Tensor] = None, *,
                   tau: float, ignore_index: int = -1):
    """SupCon over one set contrasted with itself: ``lse_i - pos_mean_i`` per row.

    Returns ``(loss, has_positive)``, both [N]; rows with no positive (or ignored) have
    ``has_positive`` False and a meaningless loss value.
    """
    lse, pos_mean, pos_count = ops.pair_stats(features, None, labels, None, groups, tau=tau,
                                              exclude_self=True, ignore_index=ignore_index)
    has_positive = pos_count > 0
    safe_lse = torch.where(has_positive, lse, torch.zeros_like(lse))
    return safe_lse - pos_mean, has_positive


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
