"""Copy-move regions by keypoint matching, verified pixel by pixel.

A copy-move duplicates part of a photograph inside the same photograph: both copies carry the
same camera, so a network that learns camera traces (the camera-trace stage, NCL fine-tuned from
it) has nothing to see there. What does show it is the duplication itself. This is the classic
keypoint pipeline of copy-move forgery detection (SIFT matched within the image with the
generalised 2-nearest-neighbour test, Amerini et al. 2011), with the regions then verified and
grown densely:

1. SIFT keypoints of the grey image (long side brought to at most ``max_side``); each keypoint's
   matches elsewhere in the same image, accepted while one match is clearly closer than the
   next (``ratio``), pairs closer than ``min_offset`` pixels dropped (a keypoint and its own
   neighbourhood);
2. up to three similarity transforms (rotation, scale 0.5-2, shift) fitted to the pairs by
   RANSAC; a transform needs ``min_matches`` pairs;
3. for each transform M, the image is compared with itself warped by M: the zero-mean normalised
   cross-correlation over 7 x 7 windows (insensitive to the brightness shift of a Poisson or
   feathered blend), kept where it exceeds ``min_ncc`` in textured windows; the components
   holding at least two matched keypoints are closed, their holes filled (flat parts of a copy
   cannot be verified, but lie inside it). The same with M's inverse gives the other copy.

Both copies are returned: which one is the duplicate cannot be told reliably from the pair
alone. Nothing here is learned; ``eval.copy_move = "keypoints"`` fuses the regions into a
network's map (``fastiml eval`` / ``predict``; the pixel score is the larger of the two).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import cv2
import numpy as np

__all__ = ["COPY_MOVE_MODES", "COPY_MOVE_SCORE", "check_mode", "copy_move_regions"]

#: ``eval.copy_move`` values: "keypoints" (this module) or "off".
COPY_MOVE_MODES = ("keypoints", "off")
#: The probability a verified copy-move pixel gets when fused with a network's map.
COPY_MOVE_SCORE = 0.99

_MAX_TRANSFORMS = 3  # duplicated regions looked for per image
_RANSAC_PX = 3.0  # reprojection error of a pair that fits a transform
_NCC_WINDOW = 7
_MIN_VARIANCE = 4.0  # grey levels^2: below it a window is flat and verifies nothing
_SCALES = (0.5, 2.0)  # scale range of an accepted transform


def check_mode(mode, name: str = "copy_move") -> str:
    """``mode`` when it is one of :data:`COPY_MOVE_MODES`, else a ValueError naming ``name``."""
    if mode not in COPY_MOVE_MODES:
        raise ValueError(f"{name} must be one of {', '.join(COPY_MOVE_MODES)}, got {mode!r}")
    return mode


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be uint8 [H, W, 3] (RGB) or [H, W] (grey), got "
                         f"{image.dtype} {list(image.shape)}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image must have at least one pixel, got shape {list(image.shape)}")
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _matched_pairs(gray: np.ndarray, ratio: float, min_offset: float) -> Tuple[np.ndarray, np.ndarray]:
    """Keypoint positions (P[i], Q[i]) whose descriptors match within the image (g2NN)."""
    kps, desc = cv2.SIFT_create(contrastThreshold=0.02).detectAndCompute(gray, None)
    none = np.zeros((0, 2), np.float32)
    if desc is None or len(kps) < 3:
        return none, none
    pts = np.float32([k.pt for k in kps])
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc, desc, k=min(8, len(kps)))
    pairs = set()
    for i, found in enumerate(knn):
        found = [m for m in found if m.trainIdx != i]  # the keypoint itself (distance 0)
        for m, following in zip(found, found[1:]):
            if m.distance >= ratio * following.distance:
                break  # g2NN: matches are taken while the next one is clearly worse
            j = m.trainIdx
            if math.hypot(*(pts[i] - pts[j])) >= min_offset:
                pairs.add((min(i, j), max(i, j)))
    if not pairs:
        return none, none
    idx = np.array(sorted(pairs))
    return pts[idx[:, 0]], pts[idx[:, 1]]


def _transforms(P: np.ndarray, Q: np.ndarray, min_matches: int) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Similarity transforms M (2 x 3, dst = M src) with the pairs that fit each, best first.
    A pair is unordered: each is tried both ways against a fitted M."""
    found = []
    for _ in range(_MAX_TRANSFORMS):
        if len(P) < min_matches:
            break
        # Orient pairs by a half-plane for RANSAC (a shift's pairs then agree); the pairs a
        # rotation flips are recovered below by trying both directions.
        v = Q - P
        flip = ((v[:, 0] < 0) | ((v[:, 0] == 0) & (v[:, 1] < 0)))[:, None]
        M, _ = cv2.estimateAffinePartial2D(np.where(flip, Q, P), np.where(flip, P, Q),
                                           method=cv2.RANSAC, ransacReprojThreshold=_RANSAC_PX,
                                           maxIters=4000, confidence=0.995)
        if M is None:
            break

        def error(a, b):
            return np.hypot(*((a @ M[:, :2].T + M[:, 2]) - b).T)

        forward, backward = error(P, Q) < _RANSAC_PX, error(Q, P) < _RANSAC_PX
        fits = forward | backward
        if fits.sum() < min_matches:
            break
        src = np.where(forward[:, None], P, Q)[fits]
        dst = np.where(forward[:, None], Q, P)[fits]
        refined, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
        found.append((M if refined is None else refined, src, dst))
        P, Q = P[~fits], Q[~fits]
    return found


def _verified_copy(gray: np.ndarray, M: np.ndarray, keypoints: np.ndarray, min_ncc: float,
                   min_offset: float, min_area: int) -> np.ndarray:
    """uint8 [H, W]: the pixels x whose neighbourhood repeats at M x (the copy M maps from)."""
    h, w = gray.shape
    k = (_NCC_WINDOW, _NCC_WINDOW)
    # warped(x) = gray(M x); pixels mapped from outside the image are marked by a NaN
    warped = cv2.warpAffine(gray, M, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    inside = ~np.isnan(warped)
    warped = np.where(inside, warped, 0.0).astype(np.float32)
    mean_a, mean_b = cv2.boxFilter(gray, -1, k), cv2.boxFilter(warped, -1, k)
    var_a = cv2.boxFilter(gray * gray, -1, k) - mean_a * mean_a
    var_b = cv2.boxFilter(warped * warped, -1, k) - mean_b * mean_b
    cov = cv2.boxFilter(gray * warped, -1, k) - mean_a * mean_b
    textured = (var_a > _MIN_VARIANCE) & (var_b > _MIN_VARIANCE)
    ncc = cov / np.sqrt(np.maximum(var_a, _MIN_VARIANCE) * np.maximum(var_b, _MIN_VARIANCE))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    shift = np.hypot(M[0, 0] * xs + M[0, 1] * ys + M[0, 2] - xs,
                     M[1, 0] * xs + M[1, 1] * ys + M[1, 2] - ys)
    match = ((ncc > min_ncc) & textured & inside & (shift >= min_offset)).astype(np.uint8)
    match = cv2.morphologyEx(match, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    match = cv2.morphologyEx(match, cv2.MORPH_CLOSE,
                             cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(match, connectivity=8)
    at = np.round(keypoints).astype(np.int64)
    hits = np.bincount(labels[at[:, 1].clip(0, h - 1), at[:, 0].clip(0, w - 1)], minlength=n)
    keep = np.zeros(n, bool)
    keep[1:] = (stats[1:, cv2.CC_STAT_AREA] >= min_area) & (hits[1:] >= 2)
    region = keep[labels].astype(np.uint8)
    if region.any():  # fill holes: background components that do not reach the border
        n_bg, bg = cv2.connectedComponents(1 - region, connectivity=4)
        outer = np.zeros(n_bg, bool)
        outer[np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))] = True
        region[~outer[bg] & (bg > 0)] = 1
    return region


def copy_move_regions(image: np.ndarray, *, ratio: float = 0.6, min_ncc: float = 0.7,
                      min_matches: int = 4, max_side: int = 1024) -> np.ndarray:
    """Regions of ``image`` that repeat elsewhere in it (both copies), by keypoint matching.

    Args:
        image: uint8 [H, W, 3] RGB (as :func:`fastiml.data.read_image` gives it) or [H, W] grey.
        ratio: g2NN test, in (0, 1): a match counts while it is closer than ``ratio`` times the
            next one (lower: fewer, surer matches).
        min_ncc: normalised cross-correlation, in (0, 1), above which a pixel's 7 x 7
            neighbourhood counts as repeated.
        min_matches: matched keypoint pairs a transform needs, >= 3.
        max_side: longer images are matched at this long side (then scaled back), >= 64.

    Returns:
        uint8 [H, W], 1 on both copies of every duplicated region found, else 0. All zeros for
        an image with too little texture to match (or too small: under 16 px a side).
    """
    gray = _check_image(image)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    if not 0.0 < min_ncc < 1.0:
        raise ValueError(f"min_ncc must be in (0, 1), got {min_ncc!r}")
    if isinstance(min_matches, bool) or not isinstance(min_matches, int) or min_matches < 3:
        raise ValueError(f"min_matches must be an int >= 3, got {min_matches!r}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 64:
        raise ValueError(f"max_side must be an int >= 64, got {max_side!r}")
    h0, w0 = gray.shape
    if min(h0, w0) < 16:
        return np.zeros((h0, w0), np.uint8)
    f = min(1.0, max_side / max(h0, w0))
    if f < 1.0:
        gray = cv2.resize(gray, (max(1, round(w0 * f)), max(1, round(h0 * f))),
                          interpolation=cv2.INTER_AREA)
    h, w = gray.shape
    # A copy closer than this to its original is indistinguishable from a textured surface.
    min_offset = max(10.0, 0.03 * max(h, w))
    min_area = max(64, int(0.002 * h * w))
    P, Q = _matched_pairs(gray, ratio, min_offset)
    gray_f = gray.astype(np.float32)
    found = np.zeros((h, w), np.uint8)
    for M, src, dst in _transforms(P, Q, min_matches):
        scale = math.sqrt(abs(float(np.linalg.det(M[:, :2]))))
        if not _SCALES[0] <= scale <= _SCALES[1]:
            continue
        found |= _verified_copy(gray_f, M, src, min_ncc, min_offset, min_area)
        found |= _verified_copy(gray_f, cv2.invertAffineTransform(M), dst, min_ncc, min_offset,
                                min_area)
    if f < 1.0:
        found = cv2.resize(found, (w0, h0), interpolation=cv2.INTER_NEAREST)
    return found
