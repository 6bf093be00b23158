"""NCL: non-mutually-exclusive contrastive learning (Zhou et al., ICCV 2023), as fastiml reads it.

From the paper: patches are tampered, authentic or *contour* (mixed); contour patches are not
mutually exclusive with either class, so a dual-branch *pivot* treats them as tampered in one
branch and as authentic in the other, and a *pivot-consistent* loss keeps the two branches'
predictions in agreement where the switch happens. Our reading (the authors released no training
code): SupCon over pooled patch embeddings of each branch, BCE for both segmentation heads, and
the pivot-consistent loss as a symmetric KL on contour patches. See README "NCL".
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastiml import ops
from fastiml.losses.functional import mean_across_ranks, supcon_per_row, world

IGNORE = -1
_CONTOUR_AS = {"tampered": 1, "authentic": 0}


class PivotConsistencyLoss(nn.Module):
    """Module form of :func:`fastiml.ops.pivot_consistency` (mines ``klass`` from the mask)."""

    def __init__(self, patch: int = 16, weight_contour: float = 1.0, weight_other: float = 0.0):
        super().__init__()
        self.patch, self.weight_contour, self.weight_other = patch, weight_contour, weight_other

    def forward(self, logit_a: Tensor, logit_b: Tensor, mask: Tensor,
                valid: Optional[Tensor] = None) -> Tensor:
        _, klass = ops.contour_mine(mask, self.patch, valid=valid)
        return ops.pivot_consistency(logit_a, logit_b, klass, self.patch,
                                     weight_contour=self.weight_contour,
                                     weight_other=self.weight_other)


def patch_labels(klass: Tensor, contour_as: Optional[str]) -> Tensor:
    """Patch class -> contrastive label: contour becomes tampered, authentic, or ignored (None)."""
    labels = klass.long()
    contour = IGNORE if contour_as is None else _CONTOUR_AS[contour_as]
    labels = torch.where(klass == 2, torch.full_like(labels, contour), labels)
    return torch.where(klass < 0, torch.full_like(labels, IGNORE), labels)


def masked_bce(logit: Tensor, target: Tensor, valid: Optional[Tensor],
               gather: bool = False) -> Tensor:
    """Mean BCE-with-logits over valid pixels (float32 math); see ``mean_across_ranks``."""
    loss = F.binary_cross_entropy_with_logits(logit.float(), target, reduction="none")
    if valid is None:
        return mean_across_ranks(loss.sum(), loss.new_tensor(float(loss.numel())), gather)
    weight = valid.float()
    return mean_across_ranks((loss * weight).sum(), weight.sum(), gather)


def pivot_weight_sum(klass: Tensor, height: int, width: int, patch: int,
                     weight_contour: float, weight_other: float,
                     fraction: Optional[Tensor] = None) -> Tensor:
    """The denominator of ``pivot_consistency``: sum over pixels of their weights (only over
    the ``fraction`` of each cell's pixels, e.g. its valid ones, when given)."""
    gh, gw = klass.shape[-2:]
    starts_y = torch.arange(gh, device=klass.device) * patch
    starts_x = torch.arange(gw, device=klass.device) * patch
    area = ((height - starts_y).clamp(max=patch)[:, None]
            * (width - starts_x).clamp(max=patch)[None, :]).float()
    weight = torch.where(klass == 2, weight_contour, torch.where(klass < 0, 0.0, weight_other))
    if fraction is not None:
        area = area * fraction
    return (weight * area).sum()


class NCLLoss(nn.Module):
    """The NCL training loss for a dual-branch network.

    ``total = BCE(logit_a) + BCE(logit_b) + lambda_contrast * (SupCon_a + SupCon_b)
    + lambda_pivot * pivot_consistency(logit_a, logit_b)``.

    Patches are the ``patch`` x ``patch`` cells of the projection maps' grid, classified by
    :func:`fastiml.ops.contour_mine` on the mask (exact tampered fractions, from the
    full-resolution mask). A patch's embedding is the mean of its projected pixels,
    L2-normalised. Branch A labels contour patches tampered, branch B authentic; SupCon runs
    through the fused ``pair_stats`` over all patches of the batch (``within_image=True``:
    within each image). Under torch.distributed (``gather_across_ranks``), each rank's patches
    are contrasted with every rank's, and all terms are scaled so that DDP's averaged gradient
    equals that of one process on the whole batch. ``patch=1`` is pixel-level NCL: every pixel of the stride-4 map is an
    anchor (131,072 rows for a batch of 8 at 512^2), affordable only because no similarity matrix
    is formed. ``contour="drop"`` ignores contour patches in both branches and drops the pivot
    term -- the paper's ablation.

    ``forward(proj_a, proj_b, logit_a, logit_b, mask, valid=None)``:
        proj_a, proj_b: Tensor[B, D, h, w] projections of the two branches.
        logit_a, logit_b: Tensor[B, 1, H, W] segmentation logits (H, W multiples of h, w are
            the usual case; other sizes fall back to an area-resized mask for the patches).
        mask: Tensor[B, H, W] (or [B, 1, H, W]), 1 = tampered; bool, uint8 or float in [0, 1].
        valid: optional bool Tensor[B, H, W]: padding pixels take no part.
    Returns ``(total, parts)``: the scalar float32 loss and a dict of its detached terms
    ``bce_a, bce_b, supcon_a, supcon_b, pivot``.
    """

    def __init__(self, patch: int = 4, tau: float = 0.1, lambda_contrast: float = 0.1,
                 lambda_pivot: float = 1.0, lo: float = 0.0, hi: float = 1.0,
                 within_image: bool = False, contour: str = "pivot",
                 weight_contour: float = 1.0, weight_other: float = 0.0,
                 gather_across_ranks: bool = True):
        super().__init__()
        if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
            raise ValueError(f"patch must be an int > 0, got {patch!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if contour not in ("pivot", "drop"):
            raise ValueError(f"contour must be 'pivot' or 'drop', got {contour!r}")
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        self.patch, self.tau = patch, tau
        self.lambda_contrast, self.lambda_pivot = lambda_contrast, lambda_pivot
        self.lo, self.hi, self.within_image, self.contour = lo, hi, within_image, contour
        self.weight_contour, self.weight_other = weight_contour, weight_other
        self.gather = gather_across_ranks

    def forward(self, proj_a: Tensor, proj_b: Tensor, logit_a: Tensor, logit_b: Tensor,
                mask: Tensor, valid: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        mask, valid = self._check(proj_a, proj_b, logit_a, logit_b, mask, valid)
        h, w = proj_a.shape[-2:]
        big_h, big_w = logit_a.shape[-2:]
        stride = big_h // h
        aligned = stride * h == big_h and stride * w == big_w
        target = mask.float() if mask.dtype != torch.uint8 else (mask != 0).float()
        # Cells on the logit grid: exact fractions from the full-resolution mask, and the cells
        # of the pivot term. When the projection grid is a whole multiple of it, they are also
        # the contrastive patches; otherwise those come from an area-resized target.
        full_patch = self.patch * stride if aligned else self.patch
        _, klass_full = ops.contour_mine(mask, full_patch, lo=self.lo, hi=self.hi, valid=valid)
        if aligned:
            klass = klass_full
        else:
            small = F.interpolate(target[:, None], size=(h, w), mode="area")[:, 0]
            small_valid = None if valid is None else F.interpolate(
                valid[:, None].float(), size=(h, w), mode="area")[:, 0] > 0.5
            _, klass = ops.contour_mine(small, self.patch, lo=self.lo, hi=self.hi,
                                        valid=small_valid)

        parts = {"bce_a": masked_bce(logit_a[:, 0], target, valid, self.gather),
                 "bce_b": masked_bce(logit_b[:, 0], target, valid, self.gather)}
        drop = self.contour == "drop"
        # Projection pixels that mostly cover padding stay out of the patch means.
        proj_valid = None if valid is None else F.interpolate(
            valid[:, None].float(), size=(h, w), mode="area") > 0.5
        parts["supcon_a"] = self._supcon(proj_a, klass, None if drop else "tampered", proj_valid)
        parts["supcon_b"] = self._supcon(proj_b, klass, None if drop else "authentic", proj_valid)
        if drop:
            pivot = logit_a.new_zeros((), dtype=torch.float32)
        else:
            pivot = self._pivot(logit_a, logit_b, klass_full, full_patch, valid)
        parts["pivot"] = pivot.float()
        total = (parts["bce_a"] + parts["bce_b"]
                 + self.lambda_contrast * (parts["supcon_a"] + parts["supcon_b"])
                 + self.lambda_pivot * parts["pivot"])
        return total, {name: value.detach() for name, value in parts.items()}

    def _pivot(self, logit_a: Tensor, logit_b: Tensor, klass: Tensor, patch: int,
               valid: Optional[Tensor]) -> Tensor:
        """The pivot-consistent term over valid pixels (a rank's share of it under DDP)."""
        height, width = logit_a.shape[-2:]
        weights = lambda fraction=None: pivot_weight_sum(  # noqa: E731
            klass, height, width, patch, self.weight_contour, self.weight_other, fraction)
        if valid is None:
            pivot = ops.pivot_consistency(logit_a, logit_b, klass, patch,
                                          weight_contour=self.weight_contour,
                                          weight_other=self.weight_other)
            share = weights() if self.gather and world()[1] > 1 else None
        else:
            # Padded pixels of partially valid cells: equal logits give J = 0 and no gradient
            # there, and the mean is re-normalised to the weight of the valid pixels.
            pad = ~valid[:, None]
            pivot = ops.pivot_consistency(logit_a.masked_fill(pad, 0), logit_b.masked_fill(pad, 0),
                                          klass, patch, weight_contour=self.weight_contour,
                                          weight_other=self.weight_other)
            share = weights(ops.contour_mine(valid, patch)[0])
            pivot = pivot * weights() / share.clamp(min=1e-12)
        if share is not None and self.gather and world()[1] > 1:  # a share of the global mean
            pivot = mean_across_ranks(pivot * share, share, True)
        return pivot

    def _supcon(self, proj: Tensor, klass: Tensor, contour_as: Optional[str],
                proj_valid: Optional[Tensor]) -> Tensor:
        """SupCon over the patch embeddings (means of valid projected pixels) of one branch."""
        if proj_valid is not None:
            weight = proj_valid.to(proj.dtype)
            proj = proj * weight
        if self.patch > 1:
            # ceil_mode: the last, partial cells average over their real pixels only.
            proj = F.avg_pool2d(proj, self.patch, ceil_mode=True)
            if proj_valid is not None:  # sum of valid pixels / their number
                proj = proj / F.avg_pool2d(weight, self.patch, ceil_mode=True).clamp(min=1e-12)
        b, d = proj.shape[:2]
        rows = F.normalize(proj.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        labels = patch_labels(klass, contour_as).reshape(-1)
        groups = None
        if self.within_image:  # image index, unique across ranks
            first = world()[0] * b
            groups = torch.arange(first, first + b, device=proj.device).repeat_interleave(
                klass[0].numel())
        loss, keep = supcon_per_row(rows, labels, groups, tau=self.tau, ignore_index=IGNORE,
                                    gather=self.gather)
        return mean_across_ranks(torch.where(keep, loss, 0.0).sum(), keep.sum(), self.gather)

    @staticmethod
    def _check(proj_a, proj_b, logit_a, logit_b, mask, valid):
        if proj_a.dim() != 4:
            raise ValueError(f"proj_a must be [B, D, h, w], got shape {tuple(proj_a.shape)}")
        if proj_b.shape != proj_a.shape:
            raise ValueError(f"proj_b must match proj_a {tuple(proj_a.shape)}, got "
                             f"{tuple(proj_b.shape)}")
        b = proj_a.shape[0]
        if logit_a.dim() != 4 or logit_a.shape[:2] != (b, 1):
            raise ValueError(f"logit_a must be [B={b}, 1, H, W], got shape {tuple(logit_a.shape)}")
        if logit_b.shape != logit_a.shape:
            raise ValueError(f"logit_b must match logit_a {tuple(logit_a.shape)}, got "
                             f"{tuple(logit_b.shape)}")
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        expected = (b,) + tuple(logit_a.shape[-2:])
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must be [B, H, W] = {list(expected)} like the logits, got "
                             f"{list(mask.shape)}")
        if valid is not None and valid.dim() == 4:
            valid = valid[:, 0]
        if valid is not None and tuple(valid.shape) != expected:
            raise ValueError(f"valid must be [B, H, W] = {list(expected)}, got "
                             f"{list(valid.shape)}")
        if proj_a.shape[-2] > logit_a.shape[-2] or proj_a.shape[-1] > logit_a.shape[-1]:
            raise ValueError("the projection maps must not be larger than the logit maps")
        return mask, valid
