"""Source mosaics of real photographs: the training data of the camera-trace stage.

A *source* is one photograph under one re-processing (none, JPEG at two qualities, down- and
up-sampling, blur, added noise). A mosaic is a crop of one source with 1-3 regions of other
sources pasted in (hard masks, pixels copied unchanged), so every pixel carries the label of the
source it came from: ``photo * len(PROCESSINGS) + processing``. Pixel SupCon on those labels
(``fastiml pretrain-trace``) teaches the encoder what tells one camera, one JPEG history or one
resampling from another -- the traces a real splice leaves -- and nothing about fastiml's own
forging code (the idea of Noiseprint and of learned self-consistency, Huh et al. 2018).

The images of one batch draw their sources from a shared pool of ``pool`` sources (batch index
``i // batch_size`` seeds the pool), so a source appears in several images of the batch and
positives cross images, not only regions of one image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import IMAGE_EXTENSIONS, read_image
from .photos import central_crop
from .procedural import jpeg_roundtrip
from .synth import random_region

__all__ = ["TraceMosaics", "PROCESSINGS", "photo_files"]

#: re-processings that make a photograph a different source (index = label offset)
PROCESSINGS = ("none", "jpeg70", "jpeg90", "down2", "up15", "blur", "noise")
#: central square of each photograph kept in memory (native pixels: traces are alike across it)
KEEP = 768


def photo_files(folders: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """Every image file directly in ``folders`` (one folder or several), sorted by name."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    files: List[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"photos: {str(folder)!r} is not a folder")
        files += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"photos: need at least 2 photographs, found {len(files)} in "
                         f"{', '.join(map(str, folders))}")
    return files


def _process(photo: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop of ``photo`` under re-processing ``kind`` (uint8 RGB)."""
    # the crop a kind reads: resampling kinds read more (down) or fewer (up) native pixels
    side = {"down2": 2 * size, "up15": int(round(size / 1.5))}.get(kind, size)
    h, w = photo.shape[:2]
    side = min(side, h, w)
    y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = photo[y:y + side, x:x + side]
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (size, size), interpolation=interp)
    if kind.startswith("jpeg"):
        return jpeg_roundtrip(crop, int(kind[4:]))
    if kind == "blur":
        return cv2.GaussianBlur(crop, (0, 0), 0.8)
    if kind == "noise":
        noisy = crop.astype(np.float32) + rng.normal(0.0, 3.0, crop.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(crop)


class TraceMosaics(Dataset):
    """Mosaics of photograph sources with per-pixel source labels (see the module docstring).

    Args:
        folders: folder(s) of photographs (>= 2 images).
        size: mosaic side in pixels.
        length: items per epoch (mosaics are drawn afresh from the index; any length works).
        batch_size: images that share one pool of sources.
        pool: sources per pool (>= 2).
        seed: with the index, the only randomness: item ``i`` is the same in every run.

    Item: ``{"image": float32 Tensor[3, size, size] in [0, 1], "labels": int64 Tensor[size, size]}``.
    """

    def __init__(self, folders, size: int = 128, length: int = 100_000, batch_size: int = 8,
                 pool: int = 6, seed: int = 0):
        for name, v, low in (("size", size, 16), ("length", length, 1), ("batch_size", batch_size, 1),
                             ("pool", pool, 2)):
            if not isinstance(v, int) or v < low:
                raise ValueError(f"TraceMosaics: {name} must be an int >= {low}, got {v!r}")
        self.files = photo_files(folders)
        self.photos = [central_crop(read_image(p), KEEP) for p in self.files]
        small = [str(p) for p, im in zip(self.files, self.photos) if min(im.shape[:2]) < size]
        if small:
            raise ValueError(f"TraceMosaics: photographs smaller than size={size}: {small[:3]}")
        self.size, self.length, self.batch_size, self.pool, self.seed = (
            size, length, batch_size, pool, seed)

    @property
    def num_labels(self) -> int:
        return len(self.photos) * len(PROCESSINGS)

    def __len__(self) -> int:
        return self.length

    def _pool(self, batch: int) -> List[Tuple[int, int]]:
        rng = np.random.default_rng([self.seed, 1, batch])
        photos = rng.choice(len(self.photos), size=min(self.pool, len(self.photos)), replace=False)
        return [(int(p), int(rng.integers(len(PROCESSINGS)))) for p in photos]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 2, index])
        pool = self._pool(index // self.batch_size)
        n = int(rng.integers(2, min(4, len(pool)) + 1))
        picks = rng.choice(len(pool), size=n, replace=False)
        sources = [pool[int(k)] for k in picks]
        size = self.size
        image = _process(self.photos[sources[0][0]], PROCESSINGS[sources[0][1]], size, rng)
        labels = np.full((size, size), sources[0][0] * len(PROCESSINGS) + sources[0][1], np.int64)
        for photo, proc in sources[1:]:
            region = random_region(rng, size, area=(0.08, 0.35)).astype(bool)
            image[region] = _process(self.photos[photo], PROCESSINGS[proc], size, rng)[region]
            labels[region] = photo * len(PROCESSINGS) + proc
        return {"image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
                "labels": torch.from_numpy(labels)}


def labels_at_stride(labels: torch.Tensor, stride: int, ignore_index: int = -1) -> torch.Tensor:
    """Source labels Tensor[B, H, W] -> Tensor[B, H/stride, W/stride]: a cell's label where all
    its pixels share it, else ``ignore_index`` (a feature at a region border sees two sources)."""
    if stride == 1:
        return labels
    x = labels[:, None].float()
    hi = torch.nn.functional.max_pool2d(x, stride)
    lo = -torch.nn.functional.max_pool2d(-x, stride)
    out = hi[:, 0].long()
    out[(hi != lo)[:, 0]] = ignore_index
    return out
