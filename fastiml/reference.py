"""Plain-PyTorch versions of every fastiml op and loss.

The ground truth for the tests and the baseline of the benchmarks: each materialises whatever it
needs (the N x M similarity matrix, upsampled masks) and relies on autograd for gradients. They
compute in the dtype they are given; tests pass float64 for ground truth.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_masks(q_label: Tensor, k_label: Tensor, q_group: Optional[Tensor],
               k_group: Optional[Tensor], exclude_self: bool, ignore_index: int
               ) -> Tuple[Tensor, Tensor]:
    """(counted, positive) boolean N x M matrices of DESIGN 2.1."""
    counted = (q_label[:, None] != ignore_index) & (k_label[None, :] != ignore_index)
    if q_group is not None:
        counted &= q_group[:, None] == k_group[None, :]
    if exclude_self:
        counted &= ~torch.eye(len(q_label), len(k_label), dtype=torch.bool,
                              device=q_label.device)
    positive = counted & (q_label[:, None] == k_label[None, :])
    return counted, positive


def pair_stats(q: Tensor, k: Optional[Tensor], q_label: Tensor, k_label: Optional[Tensor],
               q_group: Optional[Tensor] = None, k_group: Optional[Tensor] = None, *,
               tau: float = 0.1, exclude_self: bool = False, denominator: str = "all",
               ignore_index: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fastiml.ops.pair_stats` through the materialised similarity matrix."""
    if k is None:
        k, k_label, k_group = q, q_label, q_group
    s = q @ k.t() / tau
    counted, positive = pair_masks(q_label, k_label, q_group, k_group, exclude_self, ignore_index)
    den = counted if denominator == "all" else counted & ~positive
    has_den = den.any(1)
    # Empty rows get a finite stand-in before logsumexp so that no NaN reaches the gradient.
    s_den = torch.where(den, s, torch.full_like(s, float("-inf")))
    s_den = torch.where(has_den[:, None], s_den, torch.zeros_like(s))
    lse = torch.where(has_den, torch.logsumexp(s_den, dim=1),
                      torch.full_like(has_den, float("-inf"), dtype=s.dtype))
    pos_count = positive.sum(1)
    pos_mean = (s * positive).sum(1) / pos_count.clamp(min=1)
    return lse, pos_mean, pos_count


def supcontrast_loss(features: Tensor, labels: Optional[Tensor] = None,
                     mask: Optional[Tensor] = None, temperature: float = 0.07,
                     contrast_mode: str = "all", base_temperature: float = 0.07) -> Tensor:
    """The SupCon loss exactly as the SupContrast reference code computes it (Khosla et al.).

    ``features`` [bsz, n_views, ...]; ``labels`` [bsz] or ``mask`` [bsz, bsz] (neither: SimCLR).
    Anchors without a positive contribute 0 and still count in the mean (as that code does).
    """
    bsz, n_views = features.shape[0], features.shape[1]
    features = features.reshape(bsz, n_views, -1)
    if labels is not None:
        labels = labels.reshape(-1, 1)
        mask = (labels == labels.t()).to(features.dtype)
    elif mask is None:
        mask = torch.eye(bsz, dtype=features.dtype, device=features.device)
    else:
        mask = mask.to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor, anchor_count = features[:, 0], 1
    else:
        anchor, anchor_count = contrast, n_views
    logits = anchor @ contrast.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_count, n_views)
    not_self = torch.ones_like(mask)
    idx = torch.arange(bsz * anchor_count, device=features.device)
    not_self[idx, idx] = 0
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    pairs = mask.sum(1)
    pairs = torch.where(pairs < 1e-6, torch.ones_like(pairs), pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, bsz).mean()


def _tampered_weight(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask.double()
    if mask.dtype == torch.uint8:
        return (mask != 0).double()
    return mask.double()


def contour_mine(mask: Tensor, patch: int, *, lo: float = 0.0, hi: float = 1.0,
                 valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Reference of :func:`fastiml.ops.contour_mine`: zero-pad to whole cells, sum-pool."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    b, h, w = mask.shape
    keep = torch.ones_like(mask, dtype=torch.double) if valid is None else valid.double()
    if valid is not None and valid.dim() == 4:
        keep = valid[:, 0].double()
    weight = _tampered_weight(mask) * keep
    gh, gw = -(-h // patch), -(-w // patch)
    pad = (0, gw * patch - w, 0, gh * patch - h)
    tampered = F.avg_pool2d(F.pad(weight, pad)[:, None], patch, divisor_override=1)[:, 0]
    count = F.avg_pool2d(F.pad(keep, pad)[:, None], patch, divisor_override=1)[:, 0]
    # float32 division of the float32 sums: the kernel's exact arithmetic.
    frac = torch.where(count > 0, tampered.float() / count.float().clamp(min=1),
                       torch.zeros_like(tampered, dtype=torch.float32))
    klass = torch.full_like(frac, 2, dtype=torch.int8)
    klass[frac >= torch.tensor(hi, dtype=torch.float32)] = 1
    klass[frac <= torch.tensor(lo, dtype=torch.float32)] = 0
    klass[count == 0] = -1
    return frac, klass


def contour_band(mask: Tensor, radius: int, *, valid: Optional[Tensor] = None) -> Tensor:
    """Reference of :func:`fastiml.ops.contour_band`: max-pool dilations of both classes."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    keep = torch.ones_like(mask, dtype=torch.bool) if valid is None else valid.reshape(mask.shape)
    if radius == 0:
        return torch.zeros_like(keep)
    tampered = (_tampered_weight(mask) >= 0.5) & keep
    authentic = ~tampered & keep
    near = lambda m: F.max_pool2d(m.double()[:, None], 2 * radius + 1, 1, radius)[:, 0] > 0  # noqa
    return keep & near(tampered) & near(authentic)


def pivot_consistency(logit_a: Tensor, logit_b: Tensor, klass: Tensor, patch: int, *,
                      weight_contour: float = 1.0, weight_other: float = 0.0) -> Tensor:
    """Reference of :func:`fastiml.ops.pivot_consistency`: KL terms through an upsampled klass."""
    h, w = logit_a.shape[-2:]
    up = klass.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :h, :w][:, None]
    scalar = lambda v: torch.tensor(v, dtype=logit_a.dtype, device=logit_a.device)  # noqa: E731
    weight = torch.where(up == 2, scalar(weight_contour),
                         torch.where(up == -1, scalar(0.0), scalar(weight_other)))
    pa, pb = torch.sigmoid(logit_a), torch.sigmoid(logit_b)
    # Written as two KL divergences (log-sigmoids), not through the closed form the kernel uses.
    kl_ab = pa * (F.logsigmoid(logit_a) - F.logsigmoid(logit_b)) + (1 - pa) * (
        F.logsigmoid(-logit_a) - F.logsigmoid(-logit_b))
    kl_ba = pb * (F.logsigmoid(logit_b) - F.logsigmoid(logit_a)) + (1 - pb) * (
        F.logsigmoid(-logit_b) - F.logsigmoid(-logit_a))
    total = weight.sum()
    return torch.where(total > 0, (weight * (kl_ab + kl_ba)).sum() / total.clamp(min=1e-30),
                       torch.zeros_like(total))


#: MPC's five terms as DESIGN 5 describes them: (name, anchor set, contrast set). X_a: the
#: scale-1 pixels of pass a; Y_a: scales 2-4 of pass a, pooled; X_b: the scale-1 pixels of pass b.
_MPC_TERMS = (("within", "X_a", "X_a"), ("cross_scale_xy", "X_a", "Y_a"),
              ("cross_scale_yx", "Y_a", "X_a"), ("cross_modal_ab", "X_a", "X_b"),
              ("cross_modal_ba", "X_b", "X_a"))


def mpc_loss(feats_a, feats_b, mask: Tensor, tau: float = 0.1, max_pixels: Optional[int] = None,
             generator: Optional[torch.Generator] = None):
    """Reference of :class:`fastiml.losses.MPCLoss`, written from DESIGN 5 (the MPC public code's
    formulas), one image and one term at a time, every similarity matrix materialised.

    ``feats_a``, ``feats_b``: 4 maps [B, C, h_s, w_s] each (scale 1 first) of the two passes;
    ``mask`` [B, H, W] or [B, 1, H, W], > 0.5 = forged. Per image, each pixel is L2-normalised
    and labelled by the mask nearest-resized to its scale. A term (anchor set A, contrast set C,
    ``_MPC_TERMS``) takes the authentic pixels of A as anchors; an anchor's positive logit is
    ``p = mean_{a' in A authentic, a' != a} <a, a'> / tau``, its negatives the forged pixels of C:
    ``loss_a = -log(e^p / (e^p + sum_n e^{<a, n>/tau}))``. The term is the mean over its anchors,
    0 when A has fewer than 2 authentic pixels or C no forged one. Returns ``(total, parts)``: the
    mean over images of the sum of the five terms, and each term's mean over images.

    ``max_pixels`` (the public code's subsample) draws the pixels MPCLoss draws from the same
    generator: for each set in turn (X_a, Y_a, X_b) one ``torch.rand`` score per pixel of the
    batch, ordered by image, then scale, then row-major; each (image, label) of the set keeps its
    ``max_pixels`` lowest-scored pixels.
    """
    if mask.dim() == 4:
        mask = mask[:, 0]
    batch = mask.shape[0]

    def pixels(maps):
        """Per image: (rows [P, C] L2-normalised, forged [P] bool), scale by scale, row-major."""
        per_image = []
        for i in range(batch):
            rows, forged = [], []
            for fmap in maps:
                c, h, w = fmap.shape[1:]
                small = F.interpolate(mask[i][None, None].double(), size=(h, w), mode="nearest")
                rows.append(F.normalize(fmap[i].reshape(c, h * w).t(), dim=1))
                forged.append(small.reshape(-1) > 0.5)
            per_image.append((torch.cat(rows), torch.cat(forged)))
        return per_image

    def subsample(per_image):
        if max_pixels is None:
            return per_image
        sizes = [len(forged) for _, forged in per_image]
        scores = torch.rand(sum(sizes), generator=generator).split(sizes)
        kept = []
        for (rows, forged), score in zip(per_image, scores):
            keep = torch.zeros_like(forged)
            for label in (False, True):
                idx = (forged == label).nonzero()[:, 0]
                keep[idx[score[idx].argsort()[:max_pixels]]] = True
            kept.append((rows[keep], forged[keep]))
        return kept

    def term(anchor_set, contrast_set):
        (rows, forged), (c_rows, c_forged) = anchor_set, contrast_set
        anchors, negatives = rows[~forged], c_rows[c_forged]
        n = len(anchors)
        if n < 2 or len(negatives) == 0:
            return rows.sum() * 0 + c_rows.sum() * 0  # 0, still part of the graph
        sim = anchors @ anchors.t() / tau
        p = (sim.sum(1) - sim.diagonal()) / (n - 1)
        logits = torch.cat([p[:, None], anchors @ negatives.t() / tau], dim=1)
        return (torch.logsumexp(logits, 1) - p).mean()

    sets = {}  # drawn in this order: the sample depends on it
    sets["X_a"] = subsample(pixels(feats_a[:1]))
    sets["Y_a"] = subsample(pixels(feats_a[1:]))
    sets["X_b"] = subsample(pixels(feats_b[:1]))
    terms = {name: torch.stack([term(a, c) for a, c in zip(sets[a_name], sets[c_name])])
             for name, a_name, c_name in _MPC_TERMS}
    total = torch.stack(list(terms.values())).sum(0).mean()
    return total, {name: t.mean() for name, t in terms.items()}


def pair_softplus(q: Tensor, k: Optional[Tensor], q_label: Tensor, k_label: Optional[Tensor],
                  q_group: Optional[Tensor] = None, k_group: Optional[Tensor] = None, *,
                  lse: Tensor, tau: float = 0.1, exclude_self: bool = False,
                  ignore_index: int = -1) -> Tuple[Tensor, Tensor]:
    """Reference of :func:`fastiml.ops.pair_softplus` through the materialised matrix:
    ``(sum_{j positive} softplus(lse_i - s_ij), sum_{j positive} sigmoid(lse_i - s_ij))``."""
    if k is None:
        k, k_label, k_group = q, q_label, q_group
    s = q @ k.t() / tau
    _, positive = pair_masks(q_label, k_label, q_group, k_group, exclude_self, ignore_index)
    active = torch.isfinite(lse)
    # Rows without a negative get a finite stand-in so that no NaN reaches the gradient.
    x = torch.where(active, lse, torch.zeros_like(lse))[:, None] - s
    take = positive & active[:, None]
    # logaddexp(x, 0), not F.softplus: the latter returns x itself above x = 20.
    total = torch.where(take, torch.logaddexp(x, torch.zeros_like(x)), torch.zeros_like(x)).sum(1)
    weight = torch.where(take, torch.sigmoid(x), torch.zeros_like(x)).sum(1)
    return total, weight.detach()


def ntxent_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, temperature: float = 0.07) -> Tensor:
    """NT-Xent as pytorch-metric-learning defines it (cosine similarity, mean reducer), from
    the materialised matrices: one term ``-log(e^{s_ij} / (e^{s_ij} + sum_{k in N(i)}
    e^{s_ik}))`` per positive pair (i, j), averaged over positive pairs; 0 (connected) when
    there is no positive pair or no negative pair."""
    q = F.normalize(embeddings, dim=1)
    self_contrast = ref_emb is None
    k = q if self_contrast else F.normalize(ref_emb, dim=1)
    k_labels = labels if self_contrast else ref_labels
    s = q @ k.t() / temperature
    same = labels[:, None] == k_labels[None, :]
    not_self = ~torch.eye(len(q), len(k), dtype=torch.bool, device=q.device)
    positive = same & not_self if self_contrast else same
    negative = ~same
    if not positive.any() or not negative.any():
        return (embeddings * 0).sum() + (0 if self_contrast else (ref_emb * 0).sum())
    # A row without a negative has no term but its positives' 0: a finite stand-in keeps its
    # logsumexp's gradient free of NaN.
    has_negative = negative.any(1, keepdim=True)
    s_neg = torch.where(negative, s, torch.full_like(s, float("-inf")))
    neg_lse = torch.logsumexp(torch.where(has_negative, s_neg, torch.zeros_like(s)), 1)
    terms = torch.where(has_negative, torch.logaddexp(s, neg_lse[:, None]) - s,
                        torch.zeros_like(s))
    return terms[positive].sum() / positive.sum()


def clip_lse(q: Tensor, k: Tensor, scale) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fastiml.ops.clip_lse` through the materialised N x M logits."""
    s = scale * q @ k.t()
    return torch.logsumexp(s, 1), torch.logsumexp(s, 0), s.diagonal()


def siglip_loss(q: Tensor, k: Tensor, scale, bias, *, offset: int = 0) -> Tensor:
    """Reference of :func:`fastiml.ops.siglip_loss` through the materialised N x M logits:
    the sum of ``log(1 + exp(-z_ij logit_ij))``, z = +1 on the pairs (i, i + offset)."""
    logits = scale * q @ k.t() + bias
    z = -torch.ones_like(logits)
    z.diagonal(offset).fill_(1.0)
    return torch.logaddexp(torch.zeros_like(logits), -z * logits).sum()


def row_lse(q: Tensor, k: Tensor, scale) -> Tensor:
    """Reference of :func:`fastiml.ops.row_lse` through the materialised N x M logits."""
    return torch.logsumexp(scale * q @ k.t(), 1)
