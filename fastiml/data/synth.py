"""Synthetic forgeries: splicing, copy-move and inpainting with known ground-truth masks.

:func:`synthesize` writes a data set in both layouts that :class:`fastiml.data.ForgeryDataset`
reads::

    out_dir/Tp/synth_00000.png    tampered images
    out_dir/Gt/synth_00000.png    their masks (0 / 255, same stem as the image)
    out_dir/Au/synth_00003.png    authentic images (no mask)
    out_dir/list.json             [[image, mask], ...] relative to out_dir; mask "Negative" for Au
    out_dir/meta.json             per image: image, mask, kind ("authentic" for Au), area, post, ...

Forgeries (the mask is always the hard region whose pixels were changed):

- **splice**: the region is filled from ANOTHER image through a random polygon or closed Bezier
  mask. With the built-in procedural source the donor is drawn with a camera trace that clearly
  differs from the host's (noise level and/or JPEG quality), so the region carries a foreign trace.
- **copymove**: the region is filled from elsewhere in the same image, optionally rotated
  (+-30 deg) and scaled (0.8-1.25, which leaves resampling traces).
- **inpaint**: the region is filled by ``cv2.inpaint`` (Telea or Navier-Stokes), which removes the
  sensor noise inside it.

Each forgery is then, independently, with the given probabilities: re-compressed as JPEG at a
quality that differs from the host's by >= 15 inside the region only (``recompress_p``); given a
noise level that does not match (extra Gaussian noise, or denoised) inside the region
(``noise_mismatch_p``); blurred along the region's boundary (``boundary_blur_p``), hiding the
sharp seam while the mask stays the hard region.

Reproducibility: every image is a pure function of ``(seed, index)`` and the arguments, so the
same call writes byte-identical files (PNG output; OpenCV's codecs are deterministic), and the
first k images do not depend on ``n_images`` except for which of them are authentic.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .camera import jpeg_save, natural_scene, random_camera, render
from .procedural import CameraTrace, _hw, jpeg_roundtrip, procedural_image, random_trace

__all__ = ["synthesize", "random_region", "make_forgery", "KINDS", "STYLES"]

KINDS = ("splice", "copymove", "inpaint")
#: Built-in generators: "classic" (procedural scenes + CameraTrace, plain edits) and "photo"
#: (fastiml.data.camera: dead-leaves scenes through a simulated camera, edits as people make them,
#: a final re-save of every image).
STYLES = ("classic", "photo")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_OWN_FILE = re.compile(r"^synth_\d+\.(png|jpg)$")
_PLAN_STREAM = 2**32 - 1  # SeedSequence word that separates the plan stream from per-image ones


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------
def _unit_polygon(rng: np.random.Generator) -> np.ndarray:
    """Star-shaped random polygon around the origin, radius <= 1: float64 [K, 2]."""
    n = int(rng.integers(3, 13))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.4, 1.0, n)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _unit_bezier(rng: np.random.Generator) -> np.ndarray:
    """Closed smooth blob: a Catmull-Rom loop through random anchors, as cubic Beziers, sampled.

    Returns float64 [K, 2] points around the origin (radius about <= 1).
    """
    n = int(rng.integers(4, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.45, 1.0, n)
    p = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    tension = rng.uniform(0.5, 1.0)
    prev, nxt, nxt2 = np.roll(p, 1, 0), np.roll(p, -1, 0), np.roll(p, -2, 0)
    c1 = p + (nxt - prev) * (tension / 6.0)  # Bezier control points of segment p -> nxt
    c2 = nxt - (nxt2 - p) * (tension / 6.0)
    t = np.linspace(0, 1, 16, endpoint=False)[None, :, None]
    seg = ((1 - t) ** 3 * p[:, None] + 3 * (1 - t) ** 2 * t * c1[:, None]
           + 3 * (1 - t) * t**2 * c2[:, None] + t**3 * nxt[:, None])
    return seg.reshape(-1, 2)


def _raster(poly: np.ndarray, scale: float, cx: float, cy: float, h: int, w: int,
            out: np.ndarray) -> np.ndarray:
    out[:] = 0
    pts = np.round((poly * scale + (cx, cy)) * 16).astype(np.int64)
    pts = np.clip(pts, -(2**20), 2**20).astype(np.int32)  # fillPoly needs int32; clipping is safe
    cv2.fillPoly(out, [pts], 1, cv2.LINE_8, 4)
    return out


def random_region(rng: np.random.Generator, size, area: Tuple[float, float] = (0.05, 0.5),
                  shape: Optional[str] = None, max_tries: int = 20) -> np.ndarray:
    """A random hard region mask covering a fraction of the image drawn uniformly from ``area``.

    Args:
        rng: numpy Generator (the only randomness).
        size: S or (H, W).
        area: (low, high) fractions of the image, 0 < low <= high < 1.
        shape: "polygon", "bezier" or None (either, at random).
        max_tries: shapes to try before settling for the closest one found.

    Returns:
        uint8 array [H, W] in {0, 1}. Its area fraction lies in ``[low, high]`` (for ranges narrower
        than 0.004, within 0.002 of it). Should ``max_tries`` shapes all miss (not seen in tests over
        thousands of draws), the closest one is returned.
    """
    h, w = _hw(size)
    lo, hi = _check_area(area)
    buf = np.zeros((h, w), np.uint8)
    best, best_err = None, math.inf
    # A range narrower than a few rasterisation steps may hold no reachable area: allow 0.002.
    slack = 0.002 if hi - lo < 0.004 else 0.0
    for _ in range(max_tries):
        target = float(rng.uniform(lo, hi))
        kind = shape or ("polygon" if rng.random() < 0.5 else "bezier")
        if kind == "polygon":
            poly = _unit_polygon(rng)
        elif kind == "bezier":
            poly = _unit_bezier(rng)
        else:
            raise ValueError(f"shape must be 'polygon', 'bezier' or None, got {shape!r}")
        poly = poly * (1.0, rng.uniform(0.5, 1.5))  # random aspect ratio
        rot = rng.uniform(0, 2 * np.pi)
        poly = poly @ np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        # Scaling a star-shaped region about an interior point nests the regions, so the clipped
        # area grows monotonically with the scale: bisect on it.
        lo_s, hi_s = 0.0, 2.0 * math.hypot(h, w)
        for _ in range(30):
            mid = 0.5 * (lo_s + hi_s)
            a = _raster(poly, mid, cx, cy, h, w, buf).mean()
            if a < target:
                lo_s = mid
            else:
                hi_s = mid
        cand = _raster(poly, hi_s, cx, cy, h, w, buf).copy()
        a = float(cand.mean())
        err = max(lo - a, a - hi, 0.0)  # distance to the allowed interval
        if err <= slack:
            return cand
        if err < best_err:
            best, best_err = cand, err
    return best


def _check_area(area) -> Tuple[float, float]:
    try:
        lo, hi = (float(a) for a in area)
    except (TypeError, ValueError):
        raise ValueError(f"area must be a (low, high) pair of fractions, got {area!r}") from None
    if not (0.0 < lo <= hi < 1.0):
        raise ValueError(f"area must satisfy 0 < low <= high < 1, got {area!r}")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Forgeries
# ----------------------------------------------------------------------------------------------
def _composite(base: np.ndarray, fill: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None].astype(bool), fill, base)


def _splice(host: np.ndarray, donor: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            photo_edits: bool = False) -> Dict:
    # The donor is a whole other image of the host's size, so its content at the region is as
    # random as any; a mirrored donor adds variety for small source folders.
    flip = bool(rng.random() < 0.5)
    donor = donor[:, ::-1] if flip else donor
    if not photo_edits:
        return {"image": _composite(host, donor, mask), "flip": flip}
    # As an editor pastes: the donor resized / rotated to fit, its colours matched to the host
    # around the region, its edge feathered (the mask stays the hard region).
    h, w = mask.shape
    angle, scale = float(rng.uniform(-20, 20)), float(np.exp(rng.uniform(-0.4, 0.4)))
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    donor = cv2.warpAffine(np.ascontiguousarray(donor), m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
    sel = mask.astype(bool)
    if rng.random() < 0.7:
        hm, hs = host[sel].mean(0), host[sel].std(0) + 1.0
        dm, ds = donor[sel].mean(0), donor[sel].std(0) + 1.0
        t = float(rng.uniform(0.3, 1.0))  # partial colour transfer
        donor = (donor - dm) * (1 - t + t * hs / ds) + (1 - t) * dm + t * hm
    feather = float(rng.choice([0.0, rng.uniform(0.5, 2.0)]))
    alpha = mask.astype(np.float32)
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather)
        alpha = np.where(sel, np.maximum(alpha, 0.5), np.minimum(alpha, 0.5))  # hard region = mask
    out = host.astype(np.float32) * (1 - alpha[..., None]) + donor * alpha[..., None]
    return {"image": np.clip(out + 0.5, 0, 255).astype(np.uint8), "flip": flip, "angle": angle,
            "scale": scale, "feather": feather}


def _copymove(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
              photo_edits: bool = False) -> Dict:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    c_dst = np.array([xs.mean(), ys.mean()])
    # A source centre well away from the destination, so the move is visible.
    min_d = 0.25 * min(h, w)
    c_src = c_dst
    for _ in range(50):
        cand = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        if np.hypot(*(cand - c_dst)) >= min_d:
            c_src = cand
            break
    angle = float(rng.uniform(-30, 30)) if rng.random() < 0.5 else 0.0
    scale = float(rng.uniform(0.8, 1.25)) if rng.random() < 0.5 else 1.0
    if angle == 0.0 and scale == 1.0:
        c_src = np.round(c_src) + (c_dst - np.round(c_dst))  # integer shift: an exact pixel copy
    # M maps source coordinates to destination ones: rotate/scale about c_src, then move to c_dst.
    m = cv2.getRotationMatrix2D((float(c_src[0]), float(c_src[1])), angle, scale)
    m[:, 2] += c_dst - c_src
    flip = bool(photo_edits and rng.random() < 0.3)
    if flip:  # mirrored about the vertical line through the destination centre
        m = np.array([[-1.0, 0.0, 2.0 * c_dst[0]], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
    moved = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return {"image": _composite(img, moved, mask), "angle": angle, "scale": scale, "flip": flip}


def _inpaint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Dict:
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    radius = int(rng.integers(2, 6))
    out = cv2.inpaint(np.ascontiguousarray(img), mask * np.uint8(255), radius, method)
    return {"image": out, "method": "telea" if method == cv2.INPAINT_TELEA else "ns"}


def _recompress(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                host_quality: Optional[int]) -> Tuple[np.ndarray, int]:
    hq = 100 if host_quality is None else host_quality
    while True:
        q = int(rng.integers(40, 96))
        if abs(q - hq) >= 15:
            break
    return _composite(img, jpeg_roundtrip(img, q), mask), q


def _noise_mismatch(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                    host_noise: float) -> Tuple[np.ndarray, str]:
    f = img.astype(np.float32)
    if rng.random() < 0.6:
        # Enough extra noise to stand out over the host's own: total >= ~1.25x the host's level.
        sigma = float(rng.uniform(max(3.0, 0.75 * host_noise), max(10.0, 1.5 * host_noise)))
        f = f + rng.standard_normal(f.shape, dtype=np.float32) * sigma
        how = f"noise{sigma:.1f}"
    else:  # remove the host's noise inside the region (denoised / smoothed-over patch)
        f = cv2.bilateralFilter(f, 5, 20.0, 3.0) if rng.random() < 0.5 else cv2.GaussianBlur(f, (0, 0), 1.2)
        how = "denoise"
    filled = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    return _composite(img, filled, mask), how


def _boundary_blur(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    width = int(rng.integers(1, 4))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    band = (cv2.dilate(mask, kernel) - cv2.erode(mask, kernel)).astype(np.float32)
    weight = cv2.GaussianBlur(band, (0, 0), max(0.5, width / 2.0))[..., None]
    blurred = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.8, 2.0))).astype(np.float32)
    out = img.astype(np.float32) * (1.0 - weight) + blurred * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def make_forgery(kind: str, host: np.ndarray, rng: np.random.Generator, *,
                 donor: Optional[np.ndarray] = None, area: Tuple[float, float] = (0.05, 0.5),
                 host_trace: Optional[CameraTrace] = None, recompress_p: float = 0.5,
                 noise_mismatch_p: float = 0.5, boundary_blur_p: float = 0.5,
                 photo_edits: bool = False) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """Forge one image.

    Args:
        kind: "splice", "copymove" or "inpaint".
        host: uint8 [H, W, 3] RGB, the authentic image.
        rng: numpy Generator (the only randomness).
        donor: uint8 [H, W, 3] RGB, another image (required for "splice").
        area: (low, high) tampered fraction.
        host_trace: the host's camera trace if known: re-compression then picks a quality >= 15
            away from the host's, and added noise is scaled to stand out over the host's noise.
        recompress_p, noise_mismatch_p, boundary_blur_p: probabilities of the post-processing steps.
        photo_edits: edits as people make them: a spliced donor resized / rotated, colour-matched
            and feathered; copy-moved regions sometimes mirrored.

    Returns:
        (image uint8 [H, W, 3] RGB, mask uint8 [H, W] in {0, 1}, info dict of what was done).
    """
    h, w = host.shape[:2]
    mask = random_region(rng, (h, w), area)
    info: Dict = {"kind": kind}
    if kind == "splice":
        if donor is None or donor.shape != host.shape:
            raise ValueError("splice needs a donor image with the host's shape "
                             f"{host.shape}, got {None if donor is None else donor.shape}")
        res = _splice(host, donor, mask, rng, photo_edits)
    elif kind == "copymove":
        res = _copymove(host, mask, rng, photo_edits)
    elif kind == "inpaint":
        res = _inpaint(host, mask, rng)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    img = res.pop("image")
    info.update(res)
    post: List[str] = []
    if rng.random() < recompress_p:
        img, q = _recompress(img, mask, rng, None if host_trace is None else host_trace.jpeg_quality)
        post.append(f"jpeg{q}")
    if rng.random() < noise_mismatch_p:
        img, how = _noise_mismatch(img, mask, rng, 0.0 if host_trace is None else host_trace.noise_sigma)
        post.append(how)
    if rng.random() < boundary_blur_p:
        img = _boundary_blur(img, mask, rng)
        post.append("boundary_blur")
    info["post"] = post
    info["area"] = float(mask.mean())
    return np.ascontiguousarray(img), mask, info


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
class _FileSource:
    """Authentic images from a folder (top level, sorted by name), cropped to the output size."""

    def __init__(self, folder: Union[str, Path], size: Tuple[int, int]):
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"source_dir must be an existing folder, got {str(folder)!r}")
        self.files = sorted(p for p in folder.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"source_dir {str(folder)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        self.size = size
        self._decoded: Dict[int, np.ndarray] = {}  # a folder is forged from many times: decode once
        self._cached_bytes = 0

    def _decode(self, index: int) -> np.ndarray:
        img = self._decoded.get(index)
        if img is not None:
            return img
        path = self.files[index]
        data = np.fromfile(str(path), np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
        if bgr is None:
            raise ValueError(f"source_dir image {str(path)!r} could not be decoded")
        img = bgr[..., ::-1]
        if self._cached_bytes + img.nbytes <= 1 << 30:  # keep at most 1 GiB of decoded photos
            self._decoded[index] = img
            self._cached_bytes += img.nbytes
        return img

    def load(self, index: int, rng: np.random.Generator, native: bool = False) -> np.ndarray:
        """A random crop of file ``index``. ``native``: the crop keeps the photograph's own pixels
        half of the time and is otherwise downscaled by at most 4x (camera traces survive);
        else the image is first brought near the output size."""
        img = self._decode(index)
        h, w = self.size
        ih, iw = img.shape[:2]
        s = max(h / ih, w / iw)
        if native and s <= 1.0:
            s = 1.0 if rng.random() < 0.5 else max(s, float(np.exp(rng.uniform(np.log(0.25), 0))))
            if s < 1.0:
                img = cv2.resize(img, (max(w, round(iw * s)), max(h, round(ih * s))),
                                 interpolation=cv2.INTER_AREA)
        elif s > 1.0 or s < 0.5:  # bring the image near the output size, then crop at random
            s = s if s > 1.0 else s * float(rng.uniform(1.0, 1.5))
            img = cv2.resize(img, (max(w, round(iw * s)), max(h, round(ih * s))),
                             interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        ih, iw = img.shape[:2]
        y0, x0 = int(rng.integers(0, ih - h + 1)), int(rng.integers(0, iw - w + 1))
        return np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w])


# ----------------------------------------------------------------------------------------------
# Data set writer
# ----------------------------------------------------------------------------------------------
def _write_image(path: Path, img: np.ndarray) -> None:
    data = img[..., ::-1] if img.ndim == 3 else img
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(data),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1] if path.suffix == ".png"
                           else [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"OpenCV could not encode {path}")
    buf.tofile(str(path))


def _resave(img: np.ndarray, rng: np.random.Generator, p: float) -> Tuple[np.ndarray, Optional[int]]:
    """The edited (or authentic) image saved once more: JPEG with probability p, else lossless."""
    if rng.random() >= p:
        return img, None
    q = int(rng.integers(70, 99))
    return jpeg_save(img, q, chroma420=bool(rng.random() < 0.8)), q


def _check_prob(name: str, p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


def synthesize(out_dir: Union[str, Path], n_images: int, size=256, seed: int = 0,
               source_dir: Optional[Union[str, Path]] = None, kinds: Sequence[str] = KINDS,
               authentic_fraction: float = 0.2, area: Tuple[float, float] = (0.05, 0.5),
               recompress_p: float = 0.5, noise_mismatch_p: float = 0.5,
               boundary_blur_p: float = 0.5, image_format: str = "png", style: str = "classic",
               resave_p: float = 0.7) -> Dict:
    """Write a synthetic forgery data set (see the module docstring for the layout).

    Args:
        out_dir: output folder (created). Files named ``synth_<digits>.png|jpg`` already in its
            ``Tp/``, ``Gt/`` and ``Au/`` are deleted first so that a re-run leaves no stale images;
            nothing else is touched.
        n_images: total number of images (tampered + authentic), >= 1.
        size: S for S x S images, or (H, W).
        seed: non-negative int; same arguments -> byte-identical files.
        source_dir: folder of authentic images to forge (>= 2 images when splicing); None uses
            :func:`fastiml.data.procedural.procedural_image`.
        kinds: forgery kinds to use, a subset of ("splice", "copymove", "inpaint"); tampered images
            cycle through them in a seeded order, so the counts differ by at most one.
        authentic_fraction: exactly ``round(n_images * authentic_fraction)`` images are authentic.
        area: (low, high): each tampered fraction is drawn uniformly from it.
        recompress_p, noise_mismatch_p, boundary_blur_p: per-image probabilities of region-level
            JPEG re-compression, noise-level mismatch and boundary blur.
        image_format: "png" (lossless; byte-reproducible) or "jpg" (quality 95; masks stay PNG).
        style: "classic" or "photo" (see :data:`STYLES`). With "photo", procedural images are
            :func:`fastiml.data.camera.natural_scene` through a :func:`~fastiml.data.camera.render`
            camera (a splice donor through another camera), forgeries use ``photo_edits``, and
            every image, authentic or not, is finally re-saved as JPEG with probability
            ``resave_p`` (quality 70-98: double compression for JPEG hosts), else kept lossless;
            crops of ``source_dir`` photographs keep (or mildly downscale) their own pixels.

    Returns:
        dict with ``out_dir``, ``json`` (path of list.json), ``counts`` ({kind: n, "authentic": n}),
        ``n_images`` and ``items`` (per image: image, mask, kind, area, post-processing list).
    """
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    h, w = _hw(size)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {KINDS}, got {kinds!r}")
    authentic_fraction = _check_prob("authentic_fraction", authentic_fraction)
    recompress_p = _check_prob("recompress_p", recompress_p)
    noise_mismatch_p = _check_prob("noise_mismatch_p", noise_mismatch_p)
    boundary_blur_p = _check_prob("boundary_blur_p", boundary_blur_p)
    _check_area(area)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    resave_p = _check_prob("resave_p", resave_p)
    photo = style == "photo"
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    n_auth = int(round(n_images * authentic_fraction))
    if n_auth < n_images and not kinds:
        raise ValueError("kinds is empty but some images must be tampered (authentic_fraction < 1)")
    source = _FileSource(source_dir, (h, w)) if source_dir is not None else None
    if source is not None and "splice" in kinds and len(source.files) < 2:
        raise ValueError(f"splicing needs at least 2 images in source_dir, found {len(source.files)}")

    out = Path(out_dir)
    dirs = {k: out / k for k in ("Tp", "Gt", "Au")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            if f.is_file() and _OWN_FILE.match(f.name):
                f.unlink()

    # The plan (who is authentic, which kind) comes from its own stream.
    plan_rng = np.random.default_rng([int(seed), _PLAN_STREAM])
    order = plan_rng.permutation(n_images)
    plan: List[Optional[str]] = [None] * n_images
    kind_cycle = list(kinds)
    if kind_cycle:
        plan_rng.shuffle(kind_cycle)
    for j, i in enumerate(order[n_auth:]):
        plan[int(i)] = kind_cycle[j % len(kind_cycle)]

    digits = max(5, len(str(n_images - 1)))
    counts = {k: 0 for k in kinds}
    counts["authentic"] = 0
    pairs, items = [], []
    for i in range(n_images):
        rng = np.random.default_rng([int(seed), i])
        kind = plan[i]
        host_trace: Optional[CameraTrace] = None
        if source is None and photo:
            host_trace = random_camera(rng)
            host = render(natural_scene(rng, (h, w)), host_trace, rng)
        elif source is None:
            host_trace = random_trace(rng)
            host = procedural_image(rng, (h, w), host_trace)
        else:
            host_index = int(rng.integers(len(source.files)))
            host = source.load(host_index, rng, native=photo)
        name = f"synth_{i:0{digits}d}.{image_format}"
        if kind is None:
            host, resave = _resave(host, rng, resave_p) if photo else (host, None)
            _write_image(dirs["Au"] / name, host)
            pairs.append([f"Au/{name}", "Negative"])
            items.append({"image": f"Au/{name}", "mask": "Negative", "kind": "authentic", "area": 0.0,
                          "post": [] if resave is None else [f"resave{resave}"]})
            counts["authentic"] += 1
            continue
        donor = None
        if kind == "splice":
            if source is None and photo:
                donor = render(natural_scene(rng, (h, w)), random_camera(rng, different_from=host_trace),
                               rng)
            elif source is None:
                donor = procedural_image(rng, (h, w), random_trace(rng, different_from=host_trace))
            else:
                other = int(rng.integers(len(source.files) - 1))
                other += other >= host_index  # any file but the host's
                donor = source.load(other, rng, native=photo)
        img, mask, info = make_forgery(
            kind, host, rng, donor=donor, area=area, host_trace=host_trace,
            recompress_p=recompress_p, noise_mismatch_p=noise_mismatch_p,
            boundary_blur_p=boundary_blur_p, photo_edits=photo)
        if photo:
            img, resave = _resave(img, rng, resave_p)
            if resave is not None:
                info["post"].append(f"resave{resave}")
        mask_name = f"synth_{i:0{digits}d}.png"
        _write_image(dirs["Tp"] / name, img)
        _write_image(dirs["Gt"] / mask_name, mask * np.uint8(255))
        pairs.append([f"Tp/{name}", f"Gt/{mask_name}"])
        info.update(image=f"Tp/{name}", mask=f"Gt/{mask_name}")
        items.append(info)
        counts[kind] += 1

    json_path = out / "list.json"
    with open(json_path, "w") as f:
        json.dump(pairs, f, indent=0)
        f.write("\n")
    with open(out / "meta.json", "w") as f:  # `fastiml eval` reads the kinds for per_image.csv
        json.dump(items, f, indent=0)
        f.write("\n")
    return {"out_dir": str(out), "json": str(json_path), "n_images": n_images, "counts": counts,
            "items": items}
