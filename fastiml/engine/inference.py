"""Inference at the image's own resolution: whole image, or overlapping tiles blended.

Forgery traces live in the highest frequencies and resizing destroys them, so IML tools run their
networks on the image's own pixels (TruFor, CAT-Net). fastiml's networks are fully convolutional
and pad their input to their stride themselves; an image of up to ``max_pixels`` pixels goes
through in one pass, a larger one (NIST16's are 4000 x 3000) in ``tile`` x ``tile`` tiles that
overlap by ``overlap`` pixels. Each tile's prediction is weighted by a window that ramps linearly
from the tile's inner edges over the overlap (a tile edge on the image border is not ramped), and
the weighted sum is divided by the summed weights: where two ramps overlap evenly their weights add
up to one, and seams between tiles fade instead of showing.

``resolution`` (config key ``eval.resolution``, ``--resolution`` of ``eval`` and ``predict``):

- ``"native"``: the above;
- ``"train"``: the image is brought to the training size (``data.size``, ``data.mode``), as the
  network saw its training images, and the prediction resized back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

__all__ = ["RESOLUTIONS", "Tiling", "tile_starts", "blend_window", "predict_tiled", "tiling_from_config"]

RESOLUTIONS = ("native", "train")


@dataclass(frozen=True)
class Tiling:
    """How :func:`predict_tiled` cuts an image (config table ``[eval]``).

    Attributes:
        max_pixels: images with at most this many pixels (H * W) go through in one pass.
        tile: side of a square tile (pixels) for larger images.
        overlap: pixels shared by neighbouring tiles (< tile).
    """

    max_pixels: int = 1024 * 1024
    tile: int = 768
    overlap: int = 96

    def __post_init__(self):
        for name in ("max_pixels", "tile"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not (
                0 <= self.overlap < self.tile):
            raise ValueError(f"overlap must be an int in [0, tile={self.tile}), got {self.overlap!r}")


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, length)``, neighbours sharing at least
    ``overlap`` pixels; the last tile ends at ``length``. One tile at 0 when ``length <= tile``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(n: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D window of length n: 1 inside, a linear ramp over ``overlap`` at each ramped end."""
    w = torch.ones(n, dtype=torch.float32)
    if overlap > 0:
        # (i + 0.5) / overlap: two ramps of the same overlap, one rising one falling, sum to 1
        r = (torch.arange(min(overlap, n), dtype=torch.float32) + 0.5) / overlap
        if ramp_start:
            w[: r.numel()] = torch.minimum(w[: r.numel()], r)
        if ramp_end:
            w[n - r.numel():] = torch.minimum(w[n - r.numel():], r.flip(0))
    return w


def blend_window(h: int, w: int, overlap: int, top: bool = True, bottom: bool = True,
                 left: bool = True, right: bool = True) -> torch.Tensor:
    """Weights [h, w] of one tile: the outer product of 1-D ramps; a side with ``False`` (a tile
    edge on the image border) keeps weight 1 up to the edge. Every weight is > 0."""
    return _ramp(h, overlap, top, bottom)[:, None] * _ramp(w, overlap, left, right)[None, :]


@torch.no_grad()
def predict_tiled(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  tiling: Tiling = Tiling()) -> torch.Tensor:
    """Run ``predict`` on ``x`` at its own resolution, in blended tiles when it is large.

    Args:
        predict: maps Tensor[B, C, h, w] to probabilities Tensor[B, 1, h, w] (any h, w: e.g.
            ``lambda t: method.predict(net, t)``; the networks pad to their stride themselves).
        x: Tensor[B, C, H, W], what the network sees (input filter already applied to the
            whole image, so tiles do not change it).
        tiling: :class:`Tiling`.

    Returns:
        float32 Tensor[B, 1, H, W] on x's device.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a Tensor[B, C, H, W], got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if h * w <= tiling.max_pixels:
        return predict(x).float()
    t, ov = tiling.tile, tiling.overlap
    ys, xs = tile_starts(h, t, ov), tile_starts(w, t, ov)
    acc = torch.zeros(b, 1, h, w, dtype=torch.float32, device=x.device)
    norm = torch.zeros(1, 1, h, w, dtype=torch.float32, device=x.device)
    for y0 in ys:
        th = min(t, h)
        for x0 in xs:
            tw = min(t, w)
            win = blend_window(th, tw, ov, top=y0 > 0, bottom=y0 + th < h,
                               left=x0 > 0, right=x0 + tw < w).to(x.device)
            p = predict(x[..., y0:y0 + th, x0:x0 + tw]).float()
            acc[..., y0:y0 + th, x0:x0 + tw] += p * win
            norm[..., y0:y0 + th, x0:x0 + tw] += win
    return acc / norm


def tiling_from_config(eval_cfg: dict, resolution: str = "") -> Optional[Tiling]:
    """The :class:`Tiling` of a config's ``[eval]`` table, or None for ``resolution = "train"``.

    ``resolution`` overrides the table's (e.g. a command-line option); "" keeps it. Configs from
    before the table existed (old checkpoints) get the defaults: native resolution.
    """
    resolution = resolution or eval_cfg.get("resolution", "native")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    if resolution == "train":
        return None
    d = Tiling()
    return Tiling(max_pixels=int(eval_cfg.get("max_pixels", d.max_pixels)),
                  tile=int(eval_cfg.get("tile", d.tile)),
                  overlap=int(eval_cfg.get("overlap", d.overlap)))
