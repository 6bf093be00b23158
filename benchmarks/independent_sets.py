"""An independent development set: forgeries made with OpenCV, not with fastiml's forging code.

The photo benchmark (``photo_sets.py``) forges with ``fastiml.data.synthesize``, the code that
also makes the training data, so a model can score well there by learning that code. This set
forges the SAME evaluation photographs (photo_sets' ``opencv`` collection, never trained on) with
other tools: nothing of ``fastiml.data.synth``, ``fastiml.data.procedural`` or
``fastiml.data.camera`` is imported (not even ``fastiml.data``, whose package imports them); the
region shapes, crops, blending and saving are written here with OpenCV and numpy only.

- ``splice``: a region of another photograph (optionally rescaled 0.7-1.4x) pasted into the
  host with ``cv2.seamlessClone`` (Poisson; NORMAL_CLONE or MIXED_CLONE at random) or with a
  feathered alpha blend (Gaussian-blurred mask, feathered inwards).
- ``copymove``: a region of the same crop moved elsewhere in it, half of the time rotated
  (+-30 deg) and scaled (0.8-1.25) with ``cv2.warpAffine``; blended as for splice.
- ``inpaint``: a region removed with ``cv2.inpaint`` (INPAINT_TELEA or INPAINT_NS at random).
- ``authentic``: untouched crops (image-level AUC).

Regions: random star-shaped polygons, ellipses and unions of two or three of them, 2-25 % of
the image. Hosts: crops of 256, 320 or 384 px short side (aspect up to 1.5), a third of them
taken from the photograph downscaled first; small photographs give their own short side. The
mask is the region whose content was replaced (the feather lies inside it; OpenCV's Poisson
solve also shifts the host pixels of the region's bounding box by a smooth offset, which carries
no foreign detail and is left unlabelled), saved as a 0/255 PNG. Every image, authentic ones
too, is then saved as JPEG at quality 70-95 or as PNG (half each), as forgeries circulate.

    python -m benchmarks.independent_sets --out photos            # photo_sets' opencv photos
    python -m benchmarks.independent_sets --out photos --images DIR --per-kind 10 --seed 1

writes ``photos/independent/``: ``Tp/`` ``Gt/`` ``Au/``, ``list.json`` (``[image, mask]`` pairs,
``"Negative"`` for authentic: ``fastiml eval --data photos/independent/list.json`` scores a
checkpoint), ``meta.json`` (per image: kind, host and donor photograph, blend, transform,
area, file format -- the per-item list `fastiml eval` reads for its ``by_kind`` figures) and
``summary.json`` (seed, counts, sizes, photographs). Each image is a pure function of
``(seed, index)`` and the photographs: the same call writes the same bytes. Without
``--images``, the photographs are ``OUT/opencv/images`` (photo_sets' ``collect``, fetched from
Debian's opencv-doc when that folder is not complete).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

KINDS = ("splice", "copymove", "inpaint", "authentic")
SIZES = (256, 320, 384)
PER_KIND = 40
AREA = (0.02, 0.25)
JPEG_QUALITY = (70, 95)
JPEG_P = 0.5
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_BORDER = 2  # regions keep off the frame: seamlessClone zeroes its mask's outer pixel ring


# ----------------------------------------------------------------------------------- photographs
def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_photos(folder) -> List[Path]:
    """The image files of ``folder``, sorted by name; ValueError unless there are two or more
    (a splice needs a donor other than its host)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"images must be a folder of photographs, got {str(folder)!r}")
    files = _image_files(folder)
    if len(files) < 2:
        raise ValueError(f"images folder {str(folder)!r} must hold at least 2 photographs "
                         f"({', '.join(IMAGE_EXTENSIONS)}), found {len(files)}")
    return files


def read_photo(path) -> np.ndarray:
    """uint8 [H, W, 3] BGR; EXIF orientation ignored, as ``fastiml.data.read_image`` does."""
    data = np.fromfile(str(path), np.uint8)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise ValueError(f"photograph could not be decoded: {path}")
    return img


def random_crop(photo: np.ndarray, rng: np.random.Generator,
                sizes: Sequence[int] = SIZES) -> Tuple[np.ndarray, Dict]:
    """A crop whose short side is one of ``sizes`` (the photo's own short side when none fits),
    long side up to 1.5x that, a third of the time from the photograph downscaled first; info
    holds ``crop`` (the side), ``downscale`` and ``box`` ([y, x, h, w] in the scaled photo)."""
    short = min(photo.shape[:2])
    side = int(rng.choice([s for s in sizes if s <= short] or [short]))
    info = {"crop": side, "downscale": 1.0}
    if rng.random() < 1 / 3 and short >= 1.25 * side:
        f = float(rng.uniform(max(side / short, 0.5), 0.9))
        photo = cv2.resize(photo, (round(photo.shape[1] * f), round(photo.shape[0] * f)),
                           interpolation=cv2.INTER_AREA)
        info["downscale"] = round(f, 4)
    h, w = photo.shape[:2]
    long = int(side * rng.uniform(1.0, 1.5))
    ch, cw = (side, min(long, w)) if w >= h else (min(long, h), side)
    ch, cw = min(ch, h), min(cw, w)
    y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    info["box"] = [y, x, ch, cw]  # in the (downscaled) photograph
    return photo[y:y + ch, x:x + cw].copy(), info


# --------------------------------------------------------------------------------------- regions
def _shape_spec(rng: np.random.Generator, h: int, w: int) -> List[Tuple]:
    """One to three primitives (polygon or ellipse) around a common centre, radii relative."""
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    spec = []
    for k in range(int(rng.choice([1, 1, 2, 3]))):
        ox, oy = (0.0, 0.0) if k == 0 else rng.uniform(-0.8, 0.8, 2)  # union: overlapping parts
        stretch = math.exp(rng.uniform(-0.5, 0.5))
        if rng.random() < 0.5:
            n = int(rng.integers(5, 13))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = rng.uniform(0.45, 1.0, n)  # star-shaped around the centre: never self-crosses
            spec.append(("polygon", cx, cy, ox, oy, stretch, angles, radii))
        else:
            spec.append(("ellipse", cx, cy, ox, oy, stretch, float(rng.uniform(0, 180))))
    return spec


def _render(spec: List[Tuple], h: int, w: int, r: float) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for kind, cx, cy, ox, oy, stretch, *rest in spec:
        x0, y0 = cx + ox * r, cy + oy * r
        if kind == "polygon":
            angles, radii = rest
            pts = np.stack([x0 + r * radii * np.cos(angles) * stretch,
                            y0 + r * radii * np.sin(angles) / stretch], axis=1)
            cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
        else:
            axes = (max(1, round(r * stretch)), max(1, round(r / stretch)))
            cv2.ellipse(m, (round(x0), round(y0)), axes, rest[0], 0, 360, 1, -1)
    m[:_BORDER], m[-_BORDER:], m[:, :_BORDER], m[:, -_BORDER:] = 0, 0, 0, 0
    return m


def random_region(rng: np.random.Generator, h: int, w: int,
                  area: Tuple[float, float] = AREA) -> np.ndarray:
    """uint8 [h, w] in {0, 1}: a polygon, an ellipse or a union of them covering a fraction of
    the image drawn uniformly in ``area`` (kept within it), off the outer 2-pixel frame."""
    lo, hi = area
    if not 0 < lo < hi < 1:
        raise ValueError(f"area must be (low, high) with 0 < low < high < 1, got {area!r}")
    for _ in range(50):
        target = rng.uniform(lo, hi)
        spec = _shape_spec(rng, h, w)
        r = math.sqrt(target * h * w / math.pi)
        for _ in range(6):  # rescale the radius until the clipped shape covers the target
            m = _render(spec, h, w, r)
            got = m.mean()
            if lo <= got <= hi and abs(got - target) <= 0.15 * target:
                return m
            r *= math.sqrt(target / max(got, 1e-4))
    raise RuntimeError(f"no region covering {lo}-{hi} of a {h}x{w} image in 50 tries")


# ---------------------------------------------------------------------------------------- blends
def _paste(host: np.ndarray, donor: np.ndarray, region: np.ndarray,
           rng: np.random.Generator) -> Tuple[np.ndarray, str]:
    """``donor`` (host-sized, the content to show inside ``region``) blended into ``host``:
    Poisson (seamlessClone, normal or mixed) or a feathered alpha, 1/2 each. The feather keeps
    every pixel outside ``region``; Poisson keeps those outside the region's bounding box."""
    if rng.random() < 0.5:
        flag, name = ((cv2.NORMAL_CLONE, "poisson-normal") if rng.random() < 0.5
                      else (cv2.MIXED_CLONE, "poisson-mixed"))
        x, y, bw, bh = cv2.boundingRect(region)
        # seamlessClone puts the mask's bounding box at centre - size // 2: this centre keeps it
        # in place. Its solve spans the whole box, so host pixels of the box outside the region
        # move too, by a smooth offset (about 10 grey levels next to the region, fading) that
        # carries no donor detail. Kept as OpenCV makes it (restoring them would cut a seam of
        # that size); the mask stays the region, the only pixels with foreign content.
        return cv2.seamlessClone(donor, host, region * np.uint8(255), (x + bw // 2, y + bh // 2),
                                 flag), name
    sigma = float(rng.uniform(1.0, 4.0))
    # feather inwards: erode by 2 sigma, blur, cut at the region, so nothing outside changes
    k = 2 * math.ceil(2 * sigma) + 1
    inner = cv2.erode(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    alpha = cv2.GaussianBlur(inner.astype(np.float32), (0, 0), sigma) if inner.any() else \
        region.astype(np.float32)
    alpha = (alpha * region)[..., None]
    out = alpha * donor.astype(np.float32) + (1 - alpha) * host.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), f"feather{sigma:.1f}"


def splice(host: np.ndarray, donor_photo: np.ndarray, region: np.ndarray,
           rng: np.random.Generator) -> Tuple[np.ndarray, Dict]:
    """Fill ``region`` of ``host`` from a random part of ``donor_photo``, resized by a factor
    in 0.7-1.4 half of the time (clamped so the part fits the donor)."""
    x, y, bw, bh = cv2.boundingRect(region)
    dh, dw = donor_photo.shape[:2]
    scale = float(rng.uniform(0.7, 1.4)) if rng.random() < 0.5 else 1.0
    scale = max(scale, bh / dh, bw / dw)
    sh, sw = min(dh, math.ceil(bh / scale)), min(dw, math.ceil(bw / scale))
    sy, sx = int(rng.integers(dh - sh + 1)), int(rng.integers(dw - sw + 1))
    interp = int(rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA]))
    donor = host.copy()
    donor[y:y + bh, x:x + bw] = cv2.resize(donor_photo[sy:sy + sh, sx:sx + sw], (bw, bh),
                                           interpolation=interp)
    img, blend = _paste(host, donor, region, rng)
    return img, {"blend": blend, "scale": round(bw / sw, 4)}


def copy_move(host: np.ndarray, region: np.ndarray,
              rng: np.random.Generator) -> Optional[Tuple[np.ndarray, Dict]]:
    """Fill ``region`` from another place of ``host`` (a shift of at least 0.35x the region's
    box), half of the time rotated +-30 deg and scaled 0.8-1.25; None when no source place
    inside the image is found (the caller draws another region)."""
    h, w = host.shape[:2]
    x, y, bw, bh = cv2.boundingRect(region)
    c = np.array([x + (bw - 1) / 2, y + (bh - 1) / 2])
    transform = rng.random() < 0.5
    angle = float(rng.uniform(-30, 30)) if transform else 0.0
    scale = float(rng.uniform(0.8, 1.25)) if transform else 1.0
    # destination pixel p shows host(A p + t), the source rotated by -angle and shrunk by scale
    a = math.radians(angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) / scale
    corners = np.array([[x, y], [x + bw - 1, y], [x, y + bh - 1], [x + bw - 1, y + bh - 1]])
    min_shift = max(16.0, 0.35 * max(bw, bh))
    for _ in range(100):
        src_c = rng.uniform([0, 0], [w - 1, h - 1])
        if not transform:
            src_c = c + np.round(src_c - c)  # whole-pixel shift: an exact copy
        if np.hypot(*(src_c - c)) < min_shift:
            continue
        src = (corners - c) @ rot.T + src_c
        if src.min() >= 0 and (src[:, 0] <= w - 1).all() and (src[:, 1] <= h - 1).all():
            break
    else:
        return None
    m = np.hstack([rot, (src_c - rot @ c)[:, None]])
    interp = (int(rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC])) if transform
              else cv2.INTER_NEAREST)
    donor = cv2.warpAffine(host, m, (w, h), flags=interp | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT)
    img, blend = _paste(host, donor, region, rng)
    return img, {"blend": blend, "angle": round(angle, 2), "scale": round(scale, 4),
                 "shift": [round(float(v), 1) for v in src_c - c]}


def inpaint(host: np.ndarray, region: np.ndarray,
            rng: np.random.Generator) -> Tuple[np.ndarray, Dict]:
    """Remove ``region`` with ``cv2.inpaint`` (Telea or Navier-Stokes, radius 3-7)."""
    flag, name = ((cv2.INPAINT_TELEA, "telea") if rng.random() < 0.5 else (cv2.INPAINT_NS, "ns"))
    radius = int(rng.integers(3, 8))
    return (cv2.inpaint(host, region * np.uint8(255), radius, flag),  # fills the region only
            {"blend": f"inpaint-{name}", "radius": radius})


def forge(kind: str, host: np.ndarray, rng: np.random.Generator,
          donor_photo: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """One forgery of ``host`` (uint8 [H, W, 3]): (image, mask {0, 1} uint8 [H, W], info).
    ``authentic`` returns the host and an empty mask; ``splice`` needs ``donor_photo``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    h, w = host.shape[:2]
    if kind == "authentic":
        return host.copy(), np.zeros((h, w), np.uint8), {}
    if kind == "splice" and donor_photo is None:
        raise ValueError("kind 'splice' needs donor_photo, got None")
    for _ in range(20):
        region = random_region(rng, h, w)
        if kind == "splice":
            out = splice(host, donor_photo, region, rng)
        elif kind == "copymove":
            out = copy_move(host, region, rng)
        else:
            out = inpaint(host, region, rng)
        if out is not None:
            img, info = out
            info["area"] = round(float(region.mean()), 4)
            return img, region, info
    raise RuntimeError(f"no copy-move source place found for a {h}x{w} image in 20 regions")


# ------------------------------------------------------------------------------------------ set
def _encode(img: np.ndarray, rng: np.random.Generator, jpeg_p: float) -> Tuple[bytes, str, str]:
    if rng.random() < jpeg_p:
        q = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        fmt, ext = f"jpeg{q}", ".jpg"
    else:
        ok, buf = cv2.imencode(".png", img)
        fmt, ext = "png", ".png"
    if not ok:
        raise RuntimeError(f"OpenCV could not encode an image as {ext}")
    return buf.tobytes(), ext, fmt


def build(images, out_dir, per_kind: int = PER_KIND, seed: int = 0,
          sizes: Sequence[int] = SIZES, jpeg_p: float = JPEG_P) -> Dict:
    """Write ``per_kind`` images of each of KINDS forged from the photographs in ``images`` to
    ``out_dir`` (``Tp/ Gt/ Au/``, ``list.json``, ``meta.json``, ``summary.json``); returns the
    summary. Item i is of kind ``KINDS[i % 4]`` and drawn from ``default_rng([seed, i])``."""
    if isinstance(per_kind, bool) or not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind must be a positive int, got {per_kind!r}")
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 32 for s in sizes):
        raise ValueError(f"sizes must be ints >= 32, got {sizes!r}")
    if not 0.0 <= jpeg_p <= 1.0:
        raise ValueError(f"jpeg_p must be in [0, 1], got {jpeg_p!r}")
    files = list_photos(images)
    cache: Dict[int, np.ndarray] = {}

    def photo(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = read_photo(files[i])
        return cache[i]

    out = Path(out_dir)
    for sub in ("Tp", "Gt", "Au"):  # a rebuild leaves no stale files behind
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    n = per_kind * len(KINDS)
    digits = len(str(n - 1))
    pairs, items = [], []
    counts = dict.fromkeys(KINDS, 0)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        rng = np.random.default_rng([seed, i])
        host_i = int(rng.integers(len(files)))
        host, info = random_crop(photo(host_i), rng, sizes)
        donor_i = None
        if kind == "splice":
            donor_i = int(rng.integers(len(files) - 1))
            donor_i += donor_i >= host_i  # any photograph but the host's
        img, mask, forged = forge(kind, host, rng,
                                  None if donor_i is None else photo(donor_i))
        data, ext, fmt = _encode(img, rng, jpeg_p)
        stem = f"indep_{i:0{digits}d}"
        image = f"{'Au' if kind == 'authentic' else 'Tp'}/{stem}{ext}"
        (out / image).write_bytes(data)
        if kind == "authentic":
            mask_name = "Negative"
        else:
            mask_name = f"Gt/{stem}.png"
            ok, buf = cv2.imencode(".png", mask * np.uint8(255))
            (out / mask_name).write_bytes(buf.tobytes())
        pairs.append([image, mask_name])
        items.append(dict(image=image, mask=mask_name, kind=kind, host=files[host_i].name,
                          donor=None if donor_i is None else files[donor_i].name,
                          height=int(img.shape[0]), width=int(img.shape[1]), format=fmt,
                          **info, **forged))
        counts[kind] += 1
    summary = {"generator": "benchmarks.independent_sets (OpenCV; not fastiml.data.synth)",
               "seed": seed, "per_kind": per_kind, "n_images": n, "counts": counts,
               "sizes": list(sizes), "jpeg_p": jpeg_p, "images": str(Path(images)),
               "photographs": [f.name for f in files], "json": str(out / "list.json")}
    for name, obj in (("list.json", pairs), ("meta.json", items), ("summary.json", summary)):
        with open(out / name, "w") as f:
            json.dump(obj, f, indent=0 if name != "summary.json" else 1)
            f.write("\n")
    return summary


def _opencv_photos(out: Path, cache: Optional[str]) -> Path:
    """photo_sets' ``opencv`` collection in ``out/opencv/images``, collected when incomplete."""
    from benchmarks.photo_sets import PHOTO_SETS, collect

    folder = out / "opencv" / "images"
    if not folder.is_dir() or len(_image_files(folder)) < len(PHOTO_SETS["opencv"]):
        tmp = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="fastiml_debs_"))
        try:
            collect("opencv", folder, tmp)
        finally:
            if not cache:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder; the set goes to OUT/independent")
    p.add_argument("--images", help="folder of photographs to forge from (default: photo_sets' "
                                    "opencv collection in OUT/opencv/images, fetched if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-kind", type=int, default=PER_KIND,
                   help=f"images of each of {', '.join(KINDS)} (default {PER_KIND})")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                   help="crop short sides in px (default: %(default)s)")
    p.add_argument("--cache", help="where fetched packages are unpacked (default: a temp folder)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        images = Path(args.images) if args.images else _opencv_photos(out, args.cache)
        s = build(images, out / "independent", per_kind=args.per_kind, seed=args.seed,
                  sizes=args.sizes)
    except ValueError as e:
        p.error(str(e))
    print(f"independent: {s['n_images']} images {s['counts']} from {len(s['photographs'])} "
          f"photographs in {images} -> {s['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
