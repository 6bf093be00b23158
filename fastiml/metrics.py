"""Pixel- and image-level metrics for image manipulation localisation, streamed over batches.

Conventions (IMDL-BenCo's, stated precisely; the tests hold every number to scikit-learn):

- A pixel is predicted tampered when ``prob > threshold`` (strictly greater).
- Pixels whose ``valid`` is False (zero padding) are excluded from everything, including the image
  score.
- An image is **tampered** when it has at least one valid positive pixel, else **authentic**.
- Pixel metrics (F1, IoU, precision, recall, best F1, permuted F1, AUC) are computed per image
  from that image alone and averaged over **tampered** images only; authentic images contribute
  only to image-level metrics. F1 / precision of an image with no predicted positive pixel is 0
  (scikit-learn's ``zero_division=0``).
- ``pixel_f1_best``: per image, the best F1 over all thresholds (``prob >= t`` for every distinct
  value t, as in ``sklearn.metrics.precision_recall_curve``), averaged.
- ``pixel_f1_permuted``: per image, ``max(F1(prob > thr), F1((1 - prob) > thr))``, averaged; it does
  not penalise a network that localises the right region with the labels swapped.
- ``pixel_auc``: per image, the exact ROC AUC (ties count one half, as ``roc_auc_score``); an
  image with no valid negative pixel has no AUC and is left out of that average only.
- Image level: label = tampered or not; score = one of :data:`IMAGE_SCORES` of the probability
  map's valid pixels (``image_score``, config key ``eval.image_score``; :func:`image_scores`
  defines each); ``image_acc`` = accuracy of ``score > threshold``; ``image_auc`` = ROC AUC of the
  scores, None when only one class is present. ``image_auc_by_score`` holds the image AUC of every
  score of :func:`image_scores`, all from the same pass, so one evaluation shows which separates
  authentic from forged images best.
- An image with no valid pixel at all is ignored.
- A metric with nothing to average is None.

Only per-image scalars are kept (a few floats per image), never pixel maps, so evaluation memory does
not grow with the data set's pixels. Under ``torch.distributed`` :meth:`IMLMetrics.compute` gathers
the scalars of all ranks first, so every rank returns the data set's metrics.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

__all__ = ["IMLMetrics", "per_image_metrics", "image_scores", "roc_auc", "best_f1", "IMAGE_SCORES",
           "DEFAULT_IMAGE_SCORE", "DEFAULT_IMAGE_TOPK"]

_PIXEL_KEYS = ("f1", "iou", "precision", "recall", "f1_best", "f1_permuted", "auc")

#: The image scores ``image_score`` may name (config key ``eval.image_score``).
IMAGE_SCORES = ("max", "topk", "area", "mean", "weighted", "contrast")
#: The defaults of ``eval.image_score`` / ``eval.image_topk`` (the config reads them from here).
#: 1 % of a 512 x 512 map is 2621 pixels: a mean over that many no longer follows one stray
#: pixel, and it still lies inside a forged region of 1 % of the image or more.
DEFAULT_IMAGE_SCORE = "max"
DEFAULT_IMAGE_TOPK = 0.01
#: Extra fractions k whose AUC ``image_auc_by_score`` reports as ``"topk@<k>"`` and
#: ``"contrast@<k>"``, to choose k.
_TOPK_SWEEP = (0.001, 0.01, 0.05, 0.2)


def _ranked(scores: torch.Tensor, labels: torch.Tensor):
    """Sort once; per group of tied scores: start index, size, number of positives (float64)."""
    s, order = torch.sort(scores.reshape(-1))
    y = labels.reshape(-1)[order].to(torch.float64)
    _, counts = torch.unique_consecutive(s, return_counts=True)
    ends = torch.cumsum(counts, 0)
    cum_pos = torch.cumsum(y, 0)
    pos_end = cum_pos[ends - 1]
    pos_g = torch.diff(pos_end, prepend=pos_end.new_zeros(1))
    return (ends - counts).to(torch.float64), counts.to(torch.float64), pos_g


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U with mid-ranks for ties; equals ``roc_auc_score``).

    Args: scores Tensor[N] (any float dtype), labels Tensor[N] (bool or {0, 1}).
    Returns: float, NaN when only one class is present.
    """
    labels = labels.reshape(-1).bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    starts, counts, pos_g = _ranked(scores, labels)
    mid_rank = starts + (counts + 1.0) / 2.0  # 1-based average rank of each tie group
    rank_sum = float((pos_g * mid_rank).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def best_f1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Best F1 over all thresholds (``scores >= t``, t each distinct score), 0 without positives.

    Args: scores Tensor[N], labels Tensor[N] (bool or {0, 1}). Returns: float.
    """
    labels = labels.reshape(-1).bool()
    n_pos = float(labels.sum())
    if n_pos == 0:
        return 0.0
    starts, counts, pos_g = _ranked(scores, labels)
    n = float(labels.numel())
    pos_before = torch.cumsum(pos_g, 0) - pos_g  # positives strictly below each group's score
    tp = n_pos - pos_before
    predicted = n - starts  # pixels with score >= this group's score
    return float((2.0 * tp / (predicted + n_pos)).max())


def _f1_counts(pred: torch.Tensor, y: torch.Tensor):
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    return tp, fp, fn


def _check_image_score(image_score, image_topk) -> None:
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"image_score (config key eval.image_score) must be one of "
                         f"{', '.join(IMAGE_SCORES)}; got {image_score!r}")
    if (isinstance(image_topk, bool) or not isinstance(image_topk, (int, float))
            or not 0 < image_topk <= 1):
        raise ValueError(f"image_topk (config key eval.image_topk) must be a fraction in (0, 1], "
                         f"got {image_topk!r}")


def _topk_count(n: int, k: float) -> int:
    """How many of ``n`` pixels the top ``k`` fraction holds: ceil(k * n), at least 1. The small
    tolerance keeps an exact product from rounding up (0.07 * 100 is 7.000000000000001)."""
    return min(n, max(1, math.ceil(k * n - 1e-9 * n)))


def image_scores(p: torch.Tensor, threshold: float = 0.5,
                 image_topk: float = DEFAULT_IMAGE_TOPK) -> Dict[str, float]:
    """Every image score of one image's valid probabilities.

    Args:
        p: Tensor[N], N >= 1, the probabilities of the image's valid pixels (any float dtype).
        threshold: a pixel counts for ``area`` when ``prob > threshold``.
        image_topk: the fraction k of ``topk`` and ``contrast``, in (0, 1].

    Returns: {name: float}:

    - ``max``: the largest probability.
    - ``topk``: the mean of the ceil(k * N) largest (at least one pixel; k = 1: the mean).
    - ``area``: the fraction of pixels with ``prob > threshold``.
    - ``mean``: the mean probability.
    - ``weighted``: the map's mean weighted by itself, sum(p^2) / sum(p) (0 for an all-zero map):
      confident pixels count most, without a fixed k.
    - ``contrast``: ``topk`` minus the mean of the lower half (the ceil(N / 2) smallest): how far
      the most suspect pixels stand out from the map's own baseline, so that a map that is high
      all over (as on photographs unlike the training data) does not score as a forgery.
    - ``topk@<k>``, ``contrast@<k>``: those at each k of a fixed sweep (0.001, 0.01, 0.05, 0.2),
      to choose k.
    """
    p = p.reshape(-1).to(torch.float64)
    n = p.numel()
    desc = torch.sort(p, descending=True).values
    csum = torch.cumsum(desc, 0)  # csum[m - 1] / m: the mean of the m largest
    total = float(csum[-1])
    upper = n // 2  # the lower half is the rest: ceil(n / 2) pixels, the median among them
    baseline = (total - (float(csum[upper - 1]) if upper else 0.0)) / (n - upper)

    def top(k: float) -> float:
        m = _topk_count(n, k)
        return float(csum[m - 1]) / m

    out = {"max": float(desc[0]), "topk": top(image_topk),
           "area": float((p > threshold).sum()) / n,
           "mean": total / n,
           "weighted": float((p * p).sum()) / total if total > 0 else 0.0,
           "contrast": top(image_topk) - baseline}
    for k in _TOPK_SWEEP:
        out[f"topk@{k:g}"] = top(k)
        out[f"contrast@{k:g}"] = top(k) - baseline
    return out


def per_image_metrics(prob: torch.Tensor, mask: torch.Tensor, valid: Optional[torch.Tensor] = None,
                      threshold: float = 0.5, image_score: str = DEFAULT_IMAGE_SCORE,
                      image_topk: float = DEFAULT_IMAGE_TOPK) -> Optional[Dict[str, float]]:
    """All per-image quantities of one image.

    Args:
        prob: Tensor[H, W] (or [1, H, W]) of probabilities in [0, 1].
        mask: Tensor of the same shape, {0, 1} (any dtype).
        valid: optional bool Tensor of the same shape; False pixels are ignored.
        threshold: a pixel is positive when ``prob > threshold``.
        image_score, image_topk: which of :func:`image_scores` is ``score``, and its k.

    Returns:
        None if no pixel is valid; else a dict with ``score`` (the ``image_score``), ``scores``
        (every score of :func:`image_scores`), ``tampered`` (bool) and, for tampered images,
        ``f1``, ``iou``, ``precision``, ``recall``, ``f1_best``, ``f1_permuted``, ``auc`` (NaN
        without negatives).
    """
    _check_image_score(image_score, image_topk)
    p = prob.reshape(-1)
    y = mask.reshape(-1) > 0.5
    if valid is not None:
        v = valid.reshape(-1).bool()
        p, y = p[v], y[v]
    if p.numel() == 0:
        return None
    scores = image_scores(p, threshold, image_topk)
    out: Dict = {"score": scores[image_score], "scores": scores, "tampered": bool(y.any())}
    if not out["tampered"]:
        return out
    tp, fp, fn = _f1_counts(p > threshold, y)
    out["f1"] = 2.0 * tp / (2 * tp + fp + fn)  # 2tp+fn > 0 for a tampered image
    out["iou"] = tp / (tp + fp + fn)
    out["precision"] = tp / (tp + fp) if tp + fp > 0 else 0.0
    out["recall"] = tp / (tp + fn)
    tp2, fp2, fn2 = _f1_counts((1.0 - p) > threshold, y)
    out["f1_permuted"] = max(out["f1"], 2.0 * tp2 / (2 * tp2 + fp2 + fn2))
    out["f1_best"] = best_f1(p, y)
    out["auc"] = roc_auc(p, y)
    return out


def _as_bhw(t, name: str, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a Tensor [B, 1, H, W] or [B, H, W], got "
                             f"{type(t).__name__}") from None
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name} must be a Tensor [B, 1, H, W] or [B, H, W], got shape {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of prob {tuple(like.shape)} (channel dim aside), "
                         f"got {tuple(t.shape)}")
    return t


class IMLMetrics:
    """Streaming IML metrics; see the module docstring for every definition.

    Usage::

        m = IMLMetrics(threshold=0.5)
        for batch in loader:
            m.update(prob, batch["mask"], batch["valid"])
        result = m.compute()  # dict of floats (None where undefined) + counts

    Args:
        threshold: pixel / image decision threshold in [0, 1] (positive when ``prob > threshold``).
        image_score: which of :data:`IMAGE_SCORES` is the image score of ``image_auc`` and
            ``image_acc`` (config key ``eval.image_score``).
        image_topk: the fraction k of the ``topk`` score, in (0, 1] (``eval.image_topk``).

    :meth:`compute` keys: ``pixel_f1``, ``pixel_iou``, ``pixel_precision``, ``pixel_recall``,
    ``pixel_f1_best``, ``pixel_f1_permuted``, ``pixel_auc``, ``image_auc``, ``image_acc``,
    ``image_score`` (its name), ``image_auc_by_score`` ({score name: image AUC or None}),
    ``n_tampered``, ``n_authentic``.
    """

    def __init__(self, threshold: float = 0.5, image_score: str = DEFAULT_IMAGE_SCORE,
                 image_topk: float = DEFAULT_IMAGE_TOPK):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        _check_image_score(image_score, image_topk)
        self.threshold = float(threshold)
        self.image_score, self.image_topk = image_score, float(image_topk)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self._pixel: Dict[str, List[float]] = {k: [] for k in _PIXEL_KEYS}
        self._score: List[Dict[str, float]] = []  # every image score of each image
        self._label: List[int] = []

    @torch.no_grad()
    def update(self, prob, mask, valid=None) -> None:
        """Add a batch.

        Args:
            prob: Tensor[B, 1, H, W] or [B, H, W], probabilities in [0, 1] (not logits), any float
                dtype and device.
            mask: Tensor of the same spatial shape, values in {0, 1} (float, int or bool).
            valid: optional bool Tensor of the same spatial shape; False pixels are excluded.
        """
        prob = _as_bhw(prob, "prob")
        if not prob.is_floating_point():
            raise ValueError(f"prob must be a floating-point Tensor of probabilities, got {prob.dtype}")
        mask = _as_bhw(mask, "mask", prob).to(prob.device)
        if valid is not None:
            valid = _as_bhw(valid, "valid", prob).to(prob.device)
            if valid.dtype != torch.bool:
                raise ValueError(f"valid must be a bool Tensor, got {valid.dtype}")
        if prob.numel() == 0:
            return
        pmin, pmax = float(prob.min()), float(prob.max())
        if not (0.0 <= pmin and pmax <= 1.0):  # also catches NaN
            raise ValueError(f"prob must hold probabilities in [0, 1] (apply a sigmoid to logits), "
                             f"got values in [{pmin}, {pmax}]")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold values in {0, 1} (binarise 0/255 masks first), got "
                             f"values in [{float(mask.min())}, {float(mask.max())}]")
        for b in range(prob.shape[0]):
            r = per_image_metrics(prob[b], mask[b], None if valid is None else valid[b], self.threshold,
                                  self.image_score, self.image_topk)
            if r is None:
                continue
            self._score.append(r["scores"])
            self._label.append(int(r["tampered"]))
            if r["tampered"]:
                for k in _PIXEL_KEYS:
                    self._pixel[k].append(r[k])

    def _gathered(self):
        pixel, score, label = self._pixel, self._score, self._label
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: List = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (pixel, score, label))
            pixel = {k: [x for part in parts for x in part[0][k]] for k in _PIXEL_KEYS}
            score = [x for part in parts for x in part[1]]
            label = [x for part in parts for x in part[2]]
        return pixel, score, label

    def compute(self) -> Dict[str, Optional[float]]:
        """The metrics over every image seen (on all ranks under torch.distributed)."""
        pixel, score, label = self._gathered()

        def mean(xs):
            xs = [x for x in xs if not math.isnan(x)]
            return sum(xs) / len(xs) if xs else None

        out: Dict[str, Optional[float]] = {f"pixel_{k}": mean(pixel[k]) for k in _PIXEL_KEYS}
        n_tampered = sum(label)
        labels = torch.tensor(label, dtype=torch.bool)
        by_score: Dict[str, Optional[float]] = {}
        for name in (score[0] if score else {}):
            auc = roc_auc(torch.tensor([s[name] for s in score], dtype=torch.float64), labels)
            by_score[name] = None if math.isnan(auc) else auc
        if score:
            chosen = torch.tensor([s[self.image_score] for s in score], dtype=torch.float64)
            out["image_acc"] = float(((chosen > self.threshold) == labels).double().mean())
        else:
            out["image_acc"] = None
        out["image_auc"] = by_score.get(self.image_score)
        out["image_score"] = self.image_score
        out["image_auc_by_score"] = by_score
        out["n_tampered"] = n_tampered
        out["n_authentic"] = len(label) - n_tampered
        return out
