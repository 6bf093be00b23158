"""MPC: multi-view pixel contrast (Lou, Cao et al., 2024), as its public code computes it.

Within one image, pixels are authentic (0) or forged (1). Anchors are authentic pixels of a set
A; an anchor's positive logit is its mean similarity to the other authentic pixels of A,
its negatives are the forged pixels of a contrast set C:
``loss_a = -log(e^p / (e^p + sum_n e^{<a, n>/tau}))``. Five terms per image: within-image
(scale 1), cross-scale (scale 1 vs scales 2-4 pooled, both ways) and cross-modality (scale 1 of
two stochastic passes, both ways). The public code samples at most 5000 pixels per set; here
every pixel takes part unless ``max_pixels`` is set.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastiml import ops

TERMS = ("within", "cross_scale_xy", "cross_scale_yx", "cross_modal_ab", "cross_modal_ba")
AUTHENTIC, FORGED = 0, 1


class PixelSet(NamedTuple):
    """The pixels of one set for a whole batch: rows [P, C] (L2-normalised), labels, image."""
    rows: Tensor
    label: Tensor
    image: Tensor


def pixel_set(maps: Sequence[Tensor], mask: Tensor) -> PixelSet:
    """Pools the pixels of one or more B x C x h x w maps, labelled by the nearest-resized mask."""
    rows, labels, images = [], [], []
    for fmap in maps:
        b, c, h, w = fmap.shape
        small = F.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        flat = fmap.permute(0, 2, 3, 1).reshape(-1, c)
        # Half inputs are normalised in float32 and handed to the kernel in their own dtype.
        precise = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        rows.append(F.normalize(precise, dim=1).to(fmap.dtype))
        labels.append((small.reshape(-1) > 0.5).long())
        images.append(torch.arange(b, device=fmap.device).repeat_interleave(h * w))
    rows, labels, images = torch.cat(rows), torch.cat(labels), torch.cat(images)
    if len(maps) > 1:  # image-major, so that pair_stats can skip tiles of different images
        order = torch.argsort(images, stable=True)
        rows, labels, images = rows[order], labels[order], images[order]
    return PixelSet(rows, labels, images)


def sample_pixels(s: PixelSet, max_pixels: Optional[int], generator: Optional[torch.Generator]
                  ) -> PixelSet:
    """At most ``max_pixels`` pixels of each (image, label) of the set, uniformly at random.

    The public code's memory-saving subsample; ``None`` keeps every pixel. Deterministic for a
    given generator state.
    """
    if max_pixels is None:
        return s
    score = torch.rand(s.label.shape[0], generator=generator, device="cpu").to(s.label.device)
    key = s.image * 2 + s.label
    order = torch.argsort(score)
    order = order[torch.argsort(key[order], stable=True)]  # by key, random within a key
    sorted_key = key[order]
    starts = torch.searchsorted(sorted_key, sorted_key, right=False)
    rank = torch.arange(len(order), device=order.device) - starts
    keep = order[rank < max_pixels]
    keep = keep.sort().values
    return PixelSet(s.rows[keep], s.label[keep], s.image[keep])


def positive_logits(anchors: PixelSet, batch: int, tau: float) -> Tuple[Tensor, Tensor]:
    """Each authentic pixel's mean similarity to the other authentic pixels of its image and set.

    Computed in O(P D) from per-image sums (``<a, sum_b> - <a, a>``) rather than with
    ``pair_stats``' ``pos_mean``, which would cost a P x P pass: valid for any inputs, exact up
    to rounding. Returns (logit [P_auth], per-image authentic count [B]).
    """
    rows = anchors.rows
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    sums = rows.new_zeros(batch, rows.shape[1]).index_add_(0, anchors.image, rows)
    count = torch.bincount(anchors.image, minlength=batch)
    others = (count[anchors.image] - 1).clamp(min=1).to(rows.dtype)  # not int: keeps float64
    dot = (rows * sums[anchors.image]).sum(1) - (rows * rows).sum(1)
    return dot / (tau * others), count


def contrast_term(anchor_set: PixelSet, contrast_set: PixelSet, batch: int,
                  tau: float) -> Tensor:
    """One MPC term for every image of the batch: Tensor[B], 0 where the term is undefined."""
    auth = anchor_set.label == AUTHENTIC
    anchors = PixelSet(anchor_set.rows[auth], anchor_set.label[auth], anchor_set.image[auth])
    forged = contrast_set.label == FORGED
    negatives = PixelSet(contrast_set.rows[forged], contrast_set.label[forged],
                         contrast_set.image[forged])
    p, count = positive_logits(anchors, batch, tau)
    # Only forged columns are passed: with labels 0 (anchors) and 1 (columns) and
    # denominator="negatives", lse is the log-sum-exp over the forged pixels of the same image.
    lse_neg, _, _ = ops.pair_stats(anchors.rows, negatives.rows, anchors.label, negatives.label,
                                   anchors.image, negatives.image, tau=tau,
                                   denominator="negatives")
    per_anchor = torch.logaddexp(p, lse_neg) - p  # 0 when the image has no forged pixel
    defined = count[anchors.image] >= 2
    per_anchor = torch.where(defined, per_anchor, torch.zeros_like(per_anchor))
    total = per_anchor.new_zeros(batch).index_add_(0, anchors.image, per_anchor)
    has_forged = torch.bincount(negatives.image, minlength=batch) > 0
    term = total / count.clamp(min=1)
    return torch.where((count >= 2) & has_forged, term, torch.zeros_like(term))


def mpc_sets(feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], mask: Tensor,
             max_pixels: Optional[int], generator: Optional[torch.Generator]
             ) -> Dict[str, PixelSet]:
    """The four pixel sets of MPC: scale 1 (X) and scales 2-4 (Y) of pass a, scale 1 of pass b."""
    sets = {"x_a": pixel_set(feats_a[:1], mask), "y_a": pixel_set(feats_a[1:], mask),
            "x_b": pixel_set(feats_b[:1], mask)}
    return {name: sample_pixels(s, max_pixels, generator) for name, s in sets.items()}


# (anchor set, contrast set) of each term, in TERMS order.
TERM_SETS = (("x_a", "x_a"), ("x_a", "y_a"), ("y_a", "x_a"), ("x_a", "x_b"), ("x_b", "x_a"))


class MPCLoss(nn.Module):
    """The multi-view pixel-contrast loss of MPC's first training stage.

    ``forward(feats_a, feats_b, mask, generator=None)``:
        feats_a, feats_b: lists of 4 Tensor[B, C, h_s, w_s] embeddings (scale 1 = stride 4
            first) from two forward passes that differ by stochastic depth; L2-normalised here.
        mask: Tensor[B, H, W] (or [B, 1, H, W]), 1 = forged; resized to each scale with
            nearest interpolation.
        generator: the random source of ``max_pixels`` sampling (same seed, same sample).
    Returns ``(total, parts)``: the mean over images of the sum of the five terms (float32),
    and a dict of the five batch-mean terms (detached).

    ``max_pixels=None`` (default) uses every pixel, one fused ``pair_stats`` call per term for
    the whole batch (per-image groups); ``max_pixels=5000`` reproduces the public code's
    subsampling. Gathering the authentic anchors and forged columns costs one device sync per
    term (``nonzero``), and saves the kernel the other pixels' columns.
    """

    def __init__(self, tau: float = 0.1, max_pixels: Optional[int] = None):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 2):
            raise ValueError(f"max_pixels must be None or an int >= 2, got {max_pixels!r}")
        self.tau, self.max_pixels = tau, max_pixels

    def forward(self, feats_a: List[Tensor], feats_b: List[Tensor], mask: Tensor,
                generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        mask = check_mpc_inputs(feats_a, feats_b, mask)
        batch = mask.shape[0]
        sets = mpc_sets(feats_a, feats_b, mask, self.max_pixels, generator)
        terms = {name: contrast_term(sets[a], sets[c], batch, self.tau)
                 for name, (a, c) in zip(TERMS, TERM_SETS)}
        total = torch.stack(list(terms.values())).sum(0).mean()
        return total, {name: t.mean().detach() for name, t in terms.items()}


def check_mpc_inputs(feats_a, feats_b, mask) -> Tensor:
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not isinstance(feats, (list, tuple)) or len(feats) != 4:
            raise ValueError(f"{name} must be a list of 4 feature maps (strides 4, 8, 16, 32), "
                             f"got {type(feats).__name__} of length "
                             f"{len(feats) if isinstance(feats, (list, tuple)) else '-'}")
        for s, fmap in enumerate(feats):
            if not isinstance(fmap, Tensor) or fmap.dim() != 4:
                raise ValueError(f"{name}[{s}] must be a Tensor [B, C, h, w]")
    b, c = feats_a[0].shape[:2]
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        for s, fmap in enumerate(feats):
            if fmap.shape[:2] != (b, c):
                raise ValueError(f"{name}[{s}] must have batch {b} and {c} channels like "
                                 f"feats_a[0], got {tuple(fmap.shape)}")
    for s in range(4):
        if feats_b[s].shape != feats_a[s].shape:
            raise ValueError(f"feats_b[{s}] must match feats_a[{s}] {tuple(feats_a[s].shape)}, "
                             f"got {tuple(feats_b[s].shape)}")
    if not isinstance(mask, Tensor):
        raise TypeError("mask must be a Tensor")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[0] != b:
        raise ValueError(f"mask must be [B={b}, H, W], got shape {tuple(mask.shape)}")
    return mask
