"""Evaluation: streaming IML metrics over a data set, the robustness sweep, and whole-image
prediction at the original resolution.

Under torch.distributed every rank evaluates its own shard (``rank::world_size``, no padding, so
no image is counted twice) and :class:`fastiml.metrics.IMLMetrics` gathers the per-image numbers:
every rank returns the metrics of the whole data set.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fastiml.copy_move import COPY_MOVE_SCORE, check_mode, copy_move_regions
from fastiml.data import ROBUSTNESS_PROTOCOL, Degrade, ForgeryDataset, resize_or_pad
from fastiml.engine import distributed as D
from fastiml.engine.checkpoint import unwrap
from fastiml.engine.inference import Tiling, predict_tiled
from fastiml.engine.precision import autocast, resolve_amp  # re-exported: the old home
from fastiml.metrics import DEFAULT_IMAGE_SCORE, DEFAULT_IMAGE_TOPK, IMLMetrics

__all__ = ["evaluate", "robustness", "predict_image", "resolve_amp", "autocast", "ShardSampler",
           "REQUIRED_KEYS", "INPUT_FILTERS", "input_filter", "image_score_from_config",
           "copy_move_from_config", "fuse_copy_move"]

#: Keys every metrics.json written by fastiml holds.
REQUIRED_KEYS = ("pixel_f1", "pixel_iou", "pixel_auc", "image_auc", "image_acc")


# ----------------------------------------------------------------------------------------------
# Input filter
# ----------------------------------------------------------------------------------------------
INPUT_FILTERS = ("none", "highpass")


def input_filter(image: torch.Tensor, kind: str = "none") -> torch.Tensor:
    """What the network sees of a batch of images (config key ``data.input_filter``).

    - ``"none"``: the image itself.
    - ``"highpass"``: the noise residual ``0.5 + 8 * (x - mean3x3(x))`` per channel (reflect
      padding), clipped to [0, 1]. Forgery traces -- sensor noise, re-compression, resampling --
      live in the residual, some 50x weaker than the scene content in the image itself; a network
      trained from scratch finds them far sooner when given the residual (the idea of SRM
      filters and constrained convolutions in forensic networks).

    Tensor[B, 3, H, W] in [0, 1] -> same shape, dtype and device.
    """
    if kind == "none":
        return image
    if kind == "highpass":
        blur = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
        return (image - blur).mul_(8.0).add_(0.5).clamp_(0.0, 1.0)
    raise ValueError(f"input filter must be one of {', '.join(INPUT_FILTERS)}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Data-set evaluation
# ----------------------------------------------------------------------------------------------
def image_score_from_config(eval_cfg: Dict) -> Dict:
    """``image_score`` / ``image_topk`` keyword arguments (of :func:`evaluate` and
    :func:`fastiml.metrics.per_image_metrics`) from a config's ``[eval]`` table; configs from
    before the keys existed (old checkpoints) get the defaults."""
    return {"image_score": eval_cfg.get("image_score", DEFAULT_IMAGE_SCORE),
            "image_topk": eval_cfg.get("image_topk", DEFAULT_IMAGE_TOPK)}


def copy_move_from_config(eval_cfg: Dict) -> str:
    """A config's ``eval.copy_move`` ("keypoints" or "off"); configs from before the key
    existed (old checkpoints) get the default, "keypoints"."""
    return check_mode(eval_cfg.get("copy_move", "keypoints"), "eval.copy_move")


def fuse_copy_move(prob, copies):
    """A network's tampering map with copy-move regions (:mod:`fastiml.copy_move`) fused in:
    the larger of the two, a found copy counting as :data:`COPY_MOVE_SCORE`. Tensors or arrays of
    one shape."""
    if isinstance(prob, torch.Tensor):
        return torch.maximum(prob, copies.to(prob.dtype) * COPY_MOVE_SCORE)
    return np.maximum(prob, copies.astype(prob.dtype) * COPY_MOVE_SCORE)


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` of a data set of ``n`` items, in order, without padding."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class _Unreadable(NamedTuple):
    """An item that could not be read: its error text, carried to the main process (an exception
    raised in a loader worker reaches it as "Caught ValueError in DataLoader worker ...")."""
    message: str


class _EachItemItself(Dataset):
    """``dataset``'s items, each in its own place. A ForgeryDataset hands training the next
    readable item in place of one that breaks after it was listed; evaluation reads through
    ``read_item`` instead, so that no file's result is computed from another file."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            if isinstance(self.dataset, ForgeryDataset):
                return self.dataset.read_item(index)
            return self.dataset[index]
        except ValueError as e:
            return _Unreadable(str(e))


def _collate(items: List):
    broken = [item for item in items if isinstance(item, _Unreadable)]
    return broken[0] if broken else default_collate(items)


def _to_device(batch: Dict, device: torch.device) -> Dict:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, method, dataset: Dataset, *, batch_size: int = 8,
             device: Optional[torch.device] = None, amp: str = "off", num_workers: int = 0,
             threshold: float = 0.5, input_filter_kind: str = "none",
             on_batch: Optional[Callable[[Dict, torch.Tensor], None]] = None,
             tiling: Optional[Tiling] = None, image_score: str = DEFAULT_IMAGE_SCORE,
             image_topk: float = DEFAULT_IMAGE_TOPK) -> Dict:
    """Metrics of ``method``'s predictions on ``dataset``.

    Args:
        model: the method's network (a DDP wrapper is unwrapped); put in eval mode for the call
            and restored to its previous mode afterwards.
        method: a :class:`fastiml.methods.Method` (its ``predict`` turns images into probabilities).
        dataset: items as :class:`fastiml.data.ForgeryDataset` gives them (``image``, ``mask``,
            optional ``valid``); ``valid`` pixels only are scored.
        batch_size, num_workers: of the DataLoader. device: default the model's.
        amp: as :func:`resolve_amp`. threshold: pixel / image decision threshold.
        input_filter_kind: as :func:`input_filter` (the training config's ``data.input_filter``).
        on_batch: called as ``on_batch(batch, prob)`` for every batch (e.g. to save overlays).
        tiling: for images at their own resolution (``ForgeryDataset(mode="native")``, batch
            size 1): large ones go through in blended tiles (:func:`fastiml.engine.inference.
            predict_tiled`). None: the whole batch in one pass.
        image_score, image_topk: the image score of ``image_auc`` / ``image_acc`` (config keys
            ``eval.image_score``, ``eval.image_topk``; see :class:`fastiml.metrics.IMLMetrics`).

    Items with a ``copy_move`` map (``ForgeryDataset(copy_move="keypoints")``) are scored on the
    network's map fused with it (:func:`fuse_copy_move`); ``on_batch`` sees the fused map.

    An item that cannot be read (a file removed or corrupted after the data set was listed) is a
    ValueError naming the file, whatever ``num_workers``: a ForgeryDataset's training behaviour,
    the next readable item in its place, would count one image twice, miss another, and give
    ``on_batch`` results under the wrong file names. Files that fail the data set's own checks
    when it is built are left out there (``ForgeryDataset.skipped``), before any index is given.

    Returns:
        the :meth:`IMLMetrics.compute` dict (``pixel_f1``, ``pixel_iou``, ``pixel_precision``,
        ``pixel_recall``, ``pixel_f1_best``, ``pixel_f1_permuted``, ``pixel_auc``, ``image_auc``,
        ``image_acc``, ``image_score``, ``image_auc_by_score``, ``n_tampered``, ``n_authentic``)
        plus ``n_images`` and ``seconds``.
    """
    net = unwrap(model)
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    dtype = resolve_amp(amp, device)
    was_training = net.training
    net.eval()
    loader = DataLoader(_EachItemItself(dataset), batch_size=batch_size, num_workers=num_workers,
                        sampler=ShardSampler(len(dataset), D.rank(), D.world_size()),
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    metrics = IMLMetrics(threshold=threshold, image_score=image_score, image_topk=image_topk)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            if isinstance(batch, _Unreadable):
                raise ValueError(batch.message)
            batch = _to_device(batch, device)
            with autocast(device, dtype):
                x = input_filter(batch["image"], input_filter_kind)
                prob = (method.predict(net, x) if tiling is None
                        else predict_tiled(lambda t: method.predict(net, t), x, tiling))
            prob = prob.float().clamp_(0.0, 1.0)
            if "copy_move" in batch:  # ForgeryDataset(copy_move="keypoints")
                prob = fuse_copy_move(prob, batch["copy_move"][:, None])
            metrics.update(prob, batch["mask"], batch.get("valid"))
            if on_batch is not None:
                on_batch(batch, prob)
    finally:
        net.train(was_training)
    out = metrics.compute()
    out["n_images"] = out["n_tampered"] + out["n_authentic"]
    out["seconds"] = time.perf_counter() - t0
    return out


def robustness(model: nn.Module, method, source, *, size: int, mode: str,
               protocol: Optional[Dict[str, List[float]]] = None, copy_move: str = "off",
               log: Optional[Callable[[str], None]] = None, **eval_kwargs) -> Dict[str, Dict[str, Dict]]:
    """The robustness sweep: ``evaluate`` on ``source`` degraded at each protocol level.

    Degradations are applied at the original resolution, before resize / pad, reproducibly
    (noise seeded per image). ``protocol`` defaults to :data:`fastiml.data.ROBUSTNESS_PROTOCOL`.
    ``copy_move``: as :class:`fastiml.data.ForgeryDataset`'s (matched on the degraded image).

    Returns ``{kind: {str(level): metrics}}``.
    """
    protocol = ROBUSTNESS_PROTOCOL if protocol is None else protocol
    out: Dict[str, Dict[str, Dict]] = {}
    for kind, levels in protocol.items():
        out[kind] = {}
        for level in levels:
            ds = ForgeryDataset(source, size=size, mode=mode, degrade=Degrade(kind, level),
                                check="header", copy_move=copy_move)
            m = evaluate(model, method, ds, **eval_kwargs)
            out[kind][str(level)] = m
            if log is not None:
                log(f"robustness {kind} {level}: pixel_f1 {_fmt(m.get('pixel_f1'))} "
                    f"pixel_auc {_fmt(m.get('pixel_auc'))} image_auc {_fmt(m.get('image_auc'))}")
    return out


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


# ----------------------------------------------------------------------------------------------
# Whole images
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_image(model: nn.Module, method, img: np.ndarray, *, size: int, mode: str,
                  device: Optional[torch.device] = None, amp: str = "off",
                  input_filter_kind: str = "none", tiling: Optional[Tiling] = None,
                  copy_move: str = "off") -> np.ndarray:
    """Tampering probability of one image at its original resolution.

    Args:
        img: uint8 [H, W, 3] RGB (as :func:`fastiml.data.read_image` returns it).
        size, mode, input_filter_kind: how the network sees it (the training config's
            ``data.size``, ``data.mode``, ``data.input_filter``).
        tiling: None: the image is brought to ``size`` by ``mode`` (as in training). A
            :class:`fastiml.engine.inference.Tiling`: the network sees the image's own pixels,
            in blended tiles when it is large (``size`` and ``mode`` are then not used).
        copy_move: "keypoints": the map is fused (:func:`fuse_copy_move`) with the image's
            copy-move regions, found at its own resolution; "off": the network's map alone.

    Returns:
        float32 [H, W] in [0, 1]: the network's map, cropped to the real pixels (``pad``) and
        resized back to H x W (bilinear).
    """
    check_mode(copy_move)
    net = unwrap(model)
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    h, w = img.shape[:2]
    small, _, valid = resize_or_pad(img, np.zeros((h, w), np.uint8), size,
                                    "native" if tiling is not None else mode)
    x = torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1).float().div_(255.0)
    was_training = net.training
    net.eval()
    try:
        with autocast(device, resolve_amp(amp, device)):
            x = input_filter(x[None].to(device), input_filter_kind)
            prob = (method.predict(net, x) if tiling is None
                    else predict_tiled(lambda t: method.predict(net, t), x, tiling))
    finally:
        net.train(was_training)
    prob = prob.float().clamp_(0.0, 1.0)[0, 0].cpu().numpy()
    rows, cols = np.nonzero(valid.any(1))[0], np.nonzero(valid.any(0))[0]
    prob = prob[: rows[-1] + 1, : cols[-1] + 1]  # the real pixels (all of them for "resize")
    if prob.shape != (h, w):
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    prob = np.clip(prob, 0.0, 1.0).astype(np.float32)
    if copy_move == "keypoints":
        prob = fuse_copy_move(prob, copy_move_regions(img))
    return prob
