"""Forgery data sets in the layouts IML practitioners already use (IMDL-BenCo's conventions).

Sources :class:`ForgeryDataset` reads:

- a **JSON file** holding a list of ``[image, mask]`` pairs; ``mask`` may be ``"Negative"`` for an
  authentic image (all-zero mask, label 0); relative paths are resolved against the JSON's folder;
- a **folder** with ``Tp/`` (tampered images) and ``Gt/`` (masks matched by file stem, any image
  extension; ``<stem>_gt`` and ``<stem>_mask`` are accepted too), and/or ``Au/`` (authentic images);
- a **list** of such sources (concatenated, in order), whose elements may also be ``(image, mask)``
  pairs given directly.

Masks are read as grey levels (colour masks: the maximum over channels, so a red-on-black mask
works too), 0/1 masks are scaled to 0/255, and then binarised at > 127.5.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from ..copy_move import check_mode, copy_move_regions
from .transforms import resize_or_pad

__all__ = ["ForgeryDataset", "BalancedSampler", "read_image", "read_mask", "image_size",
           "IMAGE_EXTENSIONS", "NON_BINARY_FRACTION"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: A mask is "non-binary" when more than this fraction of its pixels lie strictly between 10 and
#: 245 (after 0/1 masks are scaled to 0/255). JPEG-compressed masks have a thin ring of such values
#: along edges, well under 1 %; a grey-level or soft mask has far more.
NON_BINARY_FRACTION = 0.01
_MASK_PREFERENCE = (".png", ".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")  # lossless first

PathLike = Union[str, os.PathLike]
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], Tuple[np.ndarray, np.ndarray]]


class _Unreadable(Exception):
    """A file-level problem of one item (missing, corrupt, mismatched); the message names the file."""


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
def _decode(path: str, flags: int) -> Optional[np.ndarray]:
    try:
        data = np.fromfile(path, np.uint8)  # not cv2.imread: it cannot open non-ASCII paths on Windows
    except OSError:
        return None
    if data.size == 0:
        return None
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        return None


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as uint8 [H, W, 3] RGB (grey images are replicated, alpha is dropped).

    EXIF orientation is ignored, so the pixels are those the header's size describes (and those a
    mask made for the file lines up with). Raises ValueError naming the file when it is missing or
    cannot be decoded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path}")
    bgr = _decode(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.ndim != 3 or bgr.size == 0:
        raise ValueError(f"image could not be decoded (corrupt or unsupported format): {path}")
    return np.ascontiguousarray(bgr[..., ::-1])


def _mask_levels(path: str) -> np.ndarray:
    """Decode a mask to float32 grey levels [H, W] on a 0-255 scale; ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"mask file not found: {path}")
    m = _decode(path, cv2.IMREAD_UNCHANGED)
    if m is None or m.size == 0 or m.ndim not in (2, 3):
        raise ValueError(f"mask could not be decoded (corrupt or unsupported format): {path}")
    if m.ndim == 3:
        m = m[..., :3].max(axis=2) if m.shape[2] >= 3 else m[..., 0]  # colour: max over channels
    top = float(m.max(initial=0))
    m = m.astype(np.float32, copy=False)
    if top <= 1.0:  # a 0/1 (or 0.0/1.0) mask, whatever its container
        return m * 255.0
    if top > 255.0:  # a true 16-bit (or float 0-65535) mask
        return m * (255.0 / 65535.0)
    return m


def read_mask(path: PathLike, check_binary: bool = True) -> np.ndarray:
    """Read a mask file as uint8 [H, W] in {0, 1} (1 = tampered, i.e. level > 127.5).

    Grey masks are used as they are, colour masks through the maximum over channels; masks whose
    maximum is <= 1 (0/1 masks, any depth) are scaled to 0/255 first, and masks with values above
    255 (16-bit) are scaled by 255/65535. With ``check_binary``, a mask with
    more than ``NON_BINARY_FRACTION`` of its pixels strictly between 10 and 245 raises ValueError.
    """
    path = os.fspath(path)
    m = _mask_levels(path)
    if check_binary:
        frac = float(np.count_nonzero((m > 10) & (m < 245))) / m.size
        if frac > NON_BINARY_FRACTION:
            raise ValueError(f"mask is not binary ({100 * frac:.1f}% of pixels strictly between 10 and "
                             f"245, more than {100 * NON_BINARY_FRACTION:g}%): {path}")
    return (m > 127.5).astype(np.uint8)


def image_size(path: PathLike) -> Tuple[int, int]:
    """(height, width) of an image file, from its header for PNG, JPEG and BMP (no decoding),
    by decoding otherwise. Raises ValueError naming the file when it cannot be determined."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return int(h), int(w)
            if head[:2] == b"BM" and len(head) >= 26:
                w, h = struct.unpack("<ii", head[18:26])
                return abs(int(h)), int(w)
            if head[:2] == b"\xff\xd8":
                hw = _jpeg_size(f)
                if hw is not None:
                    return hw
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (OSError, struct.error):
        pass
    img = _decode(path, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ValueError(f"image could not be decoded (corrupt or unsupported format): {path}")
    return int(img.shape[0]), int(img.shape[1])


def _jpeg_size(f) -> Optional[Tuple[int, int]]:
    """Walk JPEG markers to the first SOFn segment; None when the stream is not as expected."""
    f.seek(2)
    while True:
        b = f.read(1)
        while b == b"\xff":
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        seg = f.read(2)
        if len(seg) < 2:
            return None
        length = struct.unpack(">H", seg)[0]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return int(h), int(w)
        f.seek(length - 2, 1)


# ----------------------------------------------------------------------------------------------
# Collecting pairs from sources
# ----------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _from_json(path: Path) -> List[Tuple[str, Optional[str]]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"source {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"source {str(path)!r} must hold a JSON list of [image, mask] pairs, "
                         f"got a {type(entries).__name__}")
    root = path.parent
    pairs = []
    for i, e in enumerate(entries):
        if not (isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(x, str) for x in e)):
            raise ValueError(f"source {str(path)!r}: entry {i} must be an [image, mask] pair of "
                             f"strings, got {e!r}")
        img, mask = e
        pairs.append((str(root / img), None if mask.lower() == "negative" else str(root / mask)))
    return pairs


def _from_folder(root: Path) -> Tuple[List[Tuple[str, Optional[str]]], List[Tuple[str, str]]]:
    tp, gt, au = root / "Tp", root / "Gt", root / "Au"
    if not tp.is_dir() and not au.is_dir():
        raise ValueError(f"source folder {str(root)!r} must contain Tp/ (with Gt/) and/or Au/")
    pairs: List[Tuple[str, Optional[str]]] = []
    problems: List[Tuple[str, str]] = []
    if tp.is_dir():
        if not gt.is_dir():
            raise ValueError(f"source folder {str(root)!r} has Tp/ but no Gt/ folder of masks")
        masks: Dict[str, List[Path]] = {}
        for m in _images_in(gt):
            masks.setdefault(m.stem, []).append(m)
        for img in _images_in(tp):
            cands = masks.get(img.stem) or masks.get(img.stem + "_gt") or masks.get(img.stem + "_mask")
            if not cands:
                problems.append((str(img), f"no mask with stem {img.stem!r} in {gt}"))
                continue
            cands = sorted(cands, key=lambda p: (_MASK_PREFERENCE.index(p.suffix.lower()), p.name))
            pairs.append((str(img), str(cands[0])))
    if au.is_dir():
        pairs.extend((str(img), None) for img in _images_in(au))
    return pairs, problems


def _collect(source) -> Tuple[List[Tuple[str, Optional[str]]], List[Tuple[str, str]]]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return _from_folder(p)
        if p.is_file():
            return _from_json(p), []
        raise ValueError(f"source {str(p)!r} does not exist (expected a JSON file or a folder)")
    if isinstance(source, (list, tuple)):
        pairs, problems = [], []
        for s in source:
            if (isinstance(s, (list, tuple)) and len(s) == 2
                    and all(isinstance(x, (str, os.PathLike)) for x in s)):
                img, mask = (os.fspath(x) for x in s)
                pairs.append((img, None if mask.lower() == "negative" else mask))
            else:
                sp, sq = _collect(s)
                pairs.extend(sp)
                problems.extend(sq)
        return pairs, problems
    raise ValueError("source must be a JSON file, a Tp/Gt(/Au) folder, or a list of those or of "
                     f"(image, mask) pairs; got {type(source).__name__}")


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------
class ForgeryDataset(Dataset):
    """Images and binary tamper masks, brought to ``size x size`` by resize OR zero-padding.

    Args:
        source: JSON file of ``[image, mask]`` pairs (mask ``"Negative"`` = authentic), a folder with
            ``Tp/`` + ``Gt/`` and/or ``Au/``, or a list of these (see the module docstring).
        size: output side S.
        mode: ``"resize"`` (stretch to S x S) or ``"pad"`` (downscale to fit if larger, then pad
            bottom/right with zeros; ``valid`` marks the real pixels). One of the two, explicitly.
            ``"native"`` (evaluation at the image's own resolution) keeps every image as it is:
            items then differ in size (batch size 1).
        augment: training augmentation ``fn(img, mask, rng) -> (img, mask)`` (e.g.
            :class:`fastiml.data.Augment`), applied at original resolution after ``degrade``. Its
            generator is seeded from torch's RNG, so it differs per DataLoader worker and epoch and
            follows ``torch.manual_seed``.
        degrade: robustness degradation with the same signature (e.g. ``Degrade("jpeg", 70)``),
            applied first, at original resolution. Its generator is seeded by ``(seed, index)``:
            every evaluation sees the same degraded images.
        on_error: what to do with a bad pair found at construction (missing image or mask, mask
            size different from the image's, undecodable file, non-binary mask): ``"warn"`` skips it
            with a warning naming the file (also listed in ``self.skipped``); ``"raise"`` raises
            ValueError naming the file.
        check: ``"full"`` decodes every image and mask once (threads; catches everything above);
            ``"header"`` reads sizes from file headers only (missing files and size mismatches; corrupt
            pixel data and non-binary masks then surface while loading, see below); ``"none"`` only
            checks that the files exist.
        seed: seed of the degradation generators.
        copy_move: ``"keypoints"`` adds each item's copy-move regions
            (:func:`fastiml.copy_move.copy_move_regions`, found at the image's own resolution
            after ``degrade``, then brought to S x S as the mask is) as ``copy_move``, which
            :func:`fastiml.engine.evaluate` fuses into the network's map; ``"off"`` (default):
            no such key.

    Items that fail to load mid-epoch (file deleted or corrupted after construction, or not caught
    by a lighter ``check``) do not crash training: a warning names the file and the next readable
    item (index + 1, + 2, ... wrapping around) is returned in its place; the item is remembered as
    bad. Only when no item at all can be read is a RuntimeError raised. :meth:`read_item` (what
    evaluation uses) never substitutes: it raises ValueError naming the file.

    Each item is a dict:
        ``image`` float32 Tensor[3, S, S] in [0, 1], RGB; ``mask`` float32 Tensor[S, S] in {0, 1};
        ``valid`` bool Tensor[S, S]; ``label`` int64 Tensor[] (1 when the final mask has a tampered
        pixel, else 0); ``name`` str (the image's file name); ``size`` int64 Tensor[2], the original
        (H, W) of the file; with ``copy_move="keypoints"`` also ``copy_move`` float32 Tensor[S, S]
        in {0, 1}.
    """

    def __init__(self, source, size: int = 512, mode: str = "resize", augment: Optional[Transform] = None,
                 degrade: Optional[Transform] = None, on_error: str = "warn", check: str = "full",
                 seed: int = 0, copy_move: str = "off"):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if mode not in ("resize", "pad", "native"):
            raise ValueError(f"mode must be 'resize', 'pad' or 'native', got {mode!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if check not in ("full", "header", "none"):
            raise ValueError(f"check must be 'full', 'header' or 'none', got {check!r}")
        check_mode(copy_move)
        for name, fn in (("augment", augment), ("degrade", degrade)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be None or a callable (img, mask, rng) -> (img, mask), "
                                 f"got {type(fn).__name__}")
        self.size, self.mode = int(size), mode
        self.augment, self.degrade = augment, degrade
        self.on_error, self.check, self.seed = on_error, check, int(seed)
        self.copy_move = copy_move

        pairs, problems = _collect(source)
        for path, reason in problems:
            self._report(path, reason)
        results = self._validate(pairs)
        self.samples: List[Tuple[str, Optional[str]]] = []
        self.skipped: List[Tuple[str, str]] = [(p, r) for p, r in problems]
        for pair, err in zip(pairs, results):
            if err is None:
                self.samples.append(pair)
            else:
                self._report(pair[0], err)
                self.skipped.append((pair[0], err))
        if not self.samples:
            raise ValueError(f"no usable image in source {source!r}"
                             + (f" ({len(self.skipped)} skipped, first: {self.skipped[0][1]})"
                                if self.skipped else ""))
        if self.skipped:
            log.warning("ForgeryDataset: %d usable pairs, %d skipped", len(self.samples), len(self.skipped))
        self._bad: set = set()

    # -- construction-time checks -----------------------------------------------------------
    def _report(self, path: str, reason: str) -> None:
        msg = reason if path in reason else f"{reason}: {path}"
        if self.on_error == "raise":
            raise ValueError(msg)
        warnings.warn(f"ForgeryDataset skips {path}: {reason}", stacklevel=3)

    def _check_one(self, pair: Tuple[str, Optional[str]]) -> Optional[str]:
        img, mask = pair
        try:
            if self.check == "none":
                for p, what in ((img, "image"), (mask, "mask")):
                    if p is not None and not os.path.isfile(p):
                        return f"{what} file not found: {p}"
                return None
            if self.check == "header":
                h, w = image_size(img)
                if mask is not None:
                    if not os.path.isfile(mask):
                        return f"mask file not found: {mask}"
                    mh, mw = image_size(mask)
                    if (mh, mw) != (h, w):
                        return f"mask size {mh}x{mw} differs from image size {h}x{w}: {mask}"
                return None
            im = read_image(img)
            if mask is not None:
                m = read_mask(mask)
                if m.shape != im.shape[:2]:
                    return (f"mask size {m.shape[0]}x{m.shape[1]} differs from image size "
                            f"{im.shape[0]}x{im.shape[1]}: {mask}")
            return None
        except ValueError as e:
            return str(e)

    def _validate(self, pairs) -> List[Optional[str]]:
        if len(pairs) < 8 or self.check == "none":
            return [self._check_one(p) for p in pairs]
        # OpenCV's decoders release the GIL, so threads overlap the decoding.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
            return list(ex.map(self._check_one, pairs))

    # -- items -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        img_path, mask_path = self.samples[index]
        try:
            img = read_image(img_path)
            if mask_path is None:
                mask = np.zeros(img.shape[:2], np.uint8)
            else:
                mask = read_mask(mask_path)
                if mask.shape != img.shape[:2]:
                    raise ValueError(f"mask size {mask.shape[0]}x{mask.shape[1]} differs from image "
                                     f"size {img.shape[0]}x{img.shape[1]}: {mask_path}")
        except ValueError as e:
            raise _Unreadable(str(e)) from None
        return img, mask

    def __getitem__(self, index: int) -> Dict[str, object]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} items")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                return self._item(j)
            except _Unreadable as e:
                self._bad.add(j)
                warnings.warn(f"ForgeryDataset could not read item {j} ({e}); returning the next "
                              "readable item instead", stacklevel=2)
        raise RuntimeError(f"ForgeryDataset: none of its {n} items can be read any more")

    def read_item(self, index: int) -> Dict[str, object]:
        """Item ``index`` itself, never a stand-in (evaluation: every result must belong to its
        own file); ValueError naming the file when it cannot be read."""
        try:
            return self._item(index)
        except _Unreadable as e:
            raise ValueError(f"item {index} of the data set cannot be read any more: {e}") from None

    def _item(self, index: int) -> Dict[str, object]:
        img, mask = self._load(index)
        orig_hw = img.shape[:2]
        if self.degrade is not None:
            img, mask = self._apply(self.degrade, "degrade", img, mask,
                                    np.random.default_rng([self.seed, index]))
        if self.augment is not None:
            seed = int(torch.randint(0, 2**62, ()).item())  # per worker / epoch via torch's seeding
            img, mask = self._apply(self.augment, "augment", img, mask, np.random.default_rng(seed))
        copies = copy_move_regions(img) if self.copy_move == "keypoints" else None
        if copies is not None:  # resized with the mask, as bit 1 of it (nearest keeps the bits)
            mask = (mask > 0).astype(np.uint8) | (copies << 1)
        img, mask, valid = resize_or_pad(img, mask, self.size, self.mode)
        # Conversions in numpy: single-threaded and cheap; torch's intra-op threads would only
        # contend with the DataLoader's worker processes.
        chw = np.ascontiguousarray(img.transpose(2, 0, 1))
        binary = (mask & 1 if copies is not None else mask) > 0
        item = {
            "image": torch.from_numpy(np.divide(chw, 255, dtype=np.float32)),
            "mask": torch.from_numpy(binary.astype(np.float32)),
            "valid": torch.from_numpy(valid),
            "label": torch.tensor(int(binary.any()), dtype=torch.int64),
            "name": os.path.basename(self.samples[index][0]),
            "size": torch.tensor(orig_hw, dtype=torch.int64),
        }
        if copies is not None:
            item["copy_move"] = torch.from_numpy((mask >> 1).astype(np.float32))
        return item

    @staticmethod
    def _apply(fn, name, img, mask, rng):
        out = fn(img, mask, rng)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"{name} must return an (img, mask) tuple, got {type(out).__name__}")
        img2, mask2 = out
        if (not isinstance(img2, np.ndarray) or img2.dtype != np.uint8 or img2.ndim != 3
                or img2.shape[2] != 3):
            raise ValueError(f"{name} must return img as a uint8 array [H, W, 3], got "
                             f"{getattr(img2, 'dtype', type(img2).__name__)} {getattr(img2, 'shape', '')}")
        if not isinstance(mask2, np.ndarray) or mask2.shape != img2.shape[:2]:
            raise ValueError(f"{name} must return a mask [H, W] matching its img {img2.shape[:2]}, got "
                             f"{getattr(mask2, 'shape', type(mask2).__name__)}")
        return img2, mask2

    @property
    def labels(self) -> List[int]:
        """Per-item label from the file list alone (1 = has a mask file, 0 = "Negative" / Au/)."""
        return [0 if m is None else 1 for _, m in self.samples]

    def __repr__(self) -> str:
        return (f"ForgeryDataset({len(self)} items, size={self.size}, mode={self.mode!r}, "
                f"augment={self.augment!r}, degrade={self.degrade!r}, skipped={len(self.skipped)})")


# ----------------------------------------------------------------------------------------------
# Balanced multi-data-set sampling
# ----------------------------------------------------------------------------------------------
class BalancedSampler(Sampler):
    """Draw the same number of items from each sub-data set per epoch (IMDL-BenCo-style training
    on several data sets of very different sizes).

    Args:
        datasets: a ``torch.utils.data.ConcatDataset`` or the list of its sub-data sets' lengths;
            indices yielded are indices into the concatenation.
        num_samples: items per epoch over all sub-data sets (and all replicas); each sub-data set
            gives ``num_samples // k`` of them, the remainder going to randomly chosen ones.
            Default: the total length.
        seed: base seed; the order is a pure function of (seed, epoch).
        num_replicas, rank: for DDP, each rank yields its own ``rank::num_replicas`` slice of the
            epoch (padded by wrapping so all ranks get the same count). Default: taken from
            ``torch.distributed`` when initialised, else 1 and 0.

    Within a sub-data set, items are drawn without replacement through a fresh permutation; a
    small data set is cycled through whole permutations (so every item appears as evenly as
    possible). Call :meth:`set_epoch` before each epoch to reshuffle.
    """

    def __init__(self, datasets: Union[ConcatDataset, Sequence[int]], num_samples: Optional[int] = None,
                 seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        if isinstance(datasets, ConcatDataset):
            lengths = [len(d) for d in datasets.datasets]
        else:
            try:
                lengths = [int(n) for n in datasets]
            except (TypeError, ValueError):
                raise ValueError("datasets must be a ConcatDataset or a sequence of lengths, "
                                 f"got {datasets!r}") from None
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sub-data set must be non-empty, got lengths {lengths}")
        if num_samples is None:
            num_samples = sum(lengths)
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ddp = dist.is_available() and dist.is_initialized()
            num_replicas = (dist.get_world_size() if ddp else 1) if num_replicas is None else num_replicas
            rank = (dist.get_rank() if ddp else 0) if rank is None else rank
        if not (isinstance(num_replicas, int) and num_replicas >= 1 and isinstance(rank, int)
                and 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                             f"num_replicas={num_replicas!r}, rank={rank!r}")
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle: the next iteration uses (seed, epoch)."""
        self.epoch = int(epoch)

    def _epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        k = len(self.lengths)
        per = np.full(k, self.num_samples // k, np.int64)
        per[rng.choice(k, self.num_samples % k, replace=False)] += 1
        chunks = []
        for d, (n, want) in enumerate(zip(self.lengths, per)):
            if want == 0:
                continue
            reps = -(-int(want) // n)
            local = np.concatenate([rng.permutation(n) for _ in range(reps)])[:want]
            chunks.append(local + self.offsets[d])
        idx = np.concatenate(chunks)
        rng.shuffle(idx)
        return idx

    def __iter__(self) -> Iterator[int]:
        idx = self._epoch_indices()
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            idx = np.resize(idx, total)  # wraps around to pad
            idx = idx[self.rank::self.num_replicas]
        return iter(idx.tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)
