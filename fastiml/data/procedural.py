"""Built-in procedural source of authentic images for synthetic forgeries.

No data set can be downloaded where fastiml is developed, so the demo and the tests make their own
"photographs": natural-ish scenes (shaded gradients, filtered-noise / stripe / checker textures, a
few objects with their own shading and anti-aliased edges) passed through a per-image **camera
trace** — optics blur, sensor noise (signal-dependent, slightly spatially correlated like
demosaiced noise) and the JPEG quality the "camera" saved with. Two images get two different traces,
so a region spliced from one into the other carries a trace that does not match its surroundings,
which is what makes synthetic forgeries learnable by a small network.

Everything is a pure function of the ``numpy.random.Generator`` passed in: same generator state,
same image, byte for byte (OpenCV's JPEG codec is deterministic).

Speed: about 10 ms per 256x256 image on one core (~90 images/s measured on an idle core).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import cv2
import numpy as np

__all__ = ["CameraTrace", "random_trace", "apply_trace", "procedural_scene", "procedural_image"]

Size = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class CameraTrace:
    """What a simulated camera leaves on every pixel of its image.

    Attributes:
        noise_sigma: std of the sensor noise at mid-grey, in 8-bit levels (0 = none).
        noise_corr: std (pixels) of the Gaussian filter correlating the noise (demosaicing);
            0 = white noise.
        blur_sigma: std (pixels) of the optics blur applied to the clean scene (0 = none).
        jpeg_quality: quality the image was saved with (1-100), or None for no compression.
    """

    noise_sigma: float
    noise_corr: float
    blur_sigma: float
    jpeg_quality: Optional[int]


def random_trace(rng: np.random.Generator, different_from: Optional[CameraTrace] = None) -> CameraTrace:
    """Draw a camera trace; with ``different_from``, one that differs from it clearly.

    "Clearly" means the noise level differs by at least 2 levels *or* the JPEG qualities differ by
    at least 15 (None counts as quality 100), so that a splice always carries a mismatch.
    """
    for _ in range(100):
        trace = CameraTrace(
            noise_sigma=float(rng.uniform(0.5, 7.0)),
            noise_corr=float(rng.choice([0.0, 0.0, 0.6, 0.9])),
            blur_sigma=float(rng.choice([0.0, rng.uniform(0.3, 1.2)])),
            jpeg_quality=None if rng.random() < 0.15 else int(rng.integers(60, 101)),
        )
        if different_from is None or _clearly_different(trace, different_from):
            return trace
    # Unreachable in practice (each draw differs clearly with probability > 0.6); be explicit.
    q = different_from.jpeg_quality or 100
    return CameraTrace(
        noise_sigma=7.0 if different_from.noise_sigma < 4.0 else 0.5,
        noise_corr=0.0,
        blur_sigma=0.0,
        jpeg_quality=60 if q > 80 else 100,
    )


def _clearly_different(a: CameraTrace, b: CameraTrace) -> bool:
    qa = a.jpeg_quality if a.jpeg_quality is not None else 100
    qb = b.jpeg_quality if b.jpeg_quality is not None else 100
    return abs(a.noise_sigma - b.noise_sigma) >= 2.0 or abs(qa - qb) >= 15


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8 pixels, got {h}x{w}")
    return h, w


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Float32 HxW value noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * 0.7


def _fractal_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sum of a few octaves of value noise (clouds, terrain, foliage-like texture)."""
    base = int(rng.integers(3, 9))
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for octave in range(int(rng.integers(2, 5))):
        out += amp * _smooth_noise(rng, h, w, base * 2**octave)
        total += amp
        amp *= float(rng.uniform(0.4, 0.7))
    return out / total


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """One random texture, float32 HxW in about [-1, 1]."""
    h, w = yy.shape[0], xx.shape[1]
    kind = rng.integers(0, 4)
    if kind == 0:  # filtered noise
        return _fractal_noise(rng, h, w)
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(0.03, 0.4)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 1:  # stripes, optionally warped by low-frequency noise (wood grain, fabric)
        u = (math.cos(theta) * xx + math.sin(theta) * yy) * freq + phase
        if rng.random() < 0.5:
            u = u + 3.0 * _smooth_noise(rng, h, w, 4)
        return np.sin(u).astype(np.float32)
    if kind == 2:  # checker / tiles, softened so edges are not all perfectly sharp
        u = math.cos(theta) * xx + math.sin(theta) * yy
        v = -math.sin(theta) * xx + math.cos(theta) * yy
        t = np.sin(u * freq + phase) * np.sin(v * freq)
        return np.tanh(t * rng.uniform(2, 20)).astype(np.float32)
    # fine grain (sand, asphalt): white noise lightly blurred
    g = rng.standard_normal((h, w)).astype(np.float32)
    return cv2.GaussianBlur(g, (0, 0), float(rng.uniform(0.6, 2.0))) * 2.0


def _color(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 1], biased away from fully saturated primaries."""
    c = rng.uniform(0.0, 1.0, 3)
    grey = c.mean()
    return (grey + (c - grey) * rng.uniform(0.2, 1.0)).astype(np.float32)


def _random_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    n = int(rng.integers(3, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.5, 1.0, n)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def procedural_scene(rng: np.random.Generator, size: Size) -> np.ndarray:
    """A clean scene (no camera trace): float32 Tensor-like array [H, W, 3] in [0, 1], RGB."""
    h, w = _hw(size)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    s = float(max(h, w))

    # Background: a gradient between two colours along a random direction, modulated by a texture.
    theta = rng.uniform(0, 2 * np.pi)
    t = ((math.cos(theta) * xx + math.sin(theta) * yy) / s + 1.0) * 0.5  # ~[0, 1]
    c0, c1 = _color(rng), _color(rng)
    img = c0 + (c1 - c0) * t[..., None]
    tex = _texture(rng, yy, xx)
    img = img + (tex * rng.uniform(0.04, 0.25))[..., None] * (0.5 + 0.5 * _color(rng))

    # Objects: flat or textured shapes with their own shading; soft (anti-aliased) edges.
    layer = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(2, 9))):
        layer[:] = 0
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = s * rng.uniform(0.05, 0.35)
        shape = rng.integers(0, 4)
        if shape == 0:
            cv2.ellipse(layer, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.3, 1.0))),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif shape == 1:
            pts = cv2.boxPoints(((cx, cy), (r * rng.uniform(0.5, 2), r * rng.uniform(0.3, 2)),
                                 float(rng.uniform(0, 90))))
            cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        elif shape == 2:
            pts = _random_polygon(rng, cx, cy, r)
            cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        else:  # a thick line / pole / branch
            x2, y2 = rng.uniform(0, w), rng.uniform(0, h)
            cv2.line(layer, (int(cx), int(cy)), (int(x2), int(y2)), 255,
                     int(rng.integers(2, max(3, int(s * 0.05)))), cv2.LINE_AA)
        x0, y0, bw, bh = cv2.boundingRect(layer)
        if bw == 0 or bh == 0:
            continue
        sl = (slice(y0, y0 + bh), slice(x0, x0 + bw))  # blend in the bounding box only (speed)
        alpha = (layer[sl].astype(np.float32) * (1.0 / 255.0))[..., None]
        col = _color(rng)
        # Shading across the object: a linear ramp in a random direction (a light source).
        phi = rng.uniform(0, 2 * np.pi)
        ramp = (math.cos(phi) * (xx[:, sl[1]] - cx) + math.sin(phi) * (yy[sl[0]] - cy)) / max(r, 1.0)
        shade = 1.0 + rng.uniform(0.0, 0.35) * np.clip(ramp, -1.5, 1.5)
        obj = col * shade[..., None]
        if rng.random() < 0.5:
            otex = _texture(rng, yy[sl[0]], xx[:, sl[1]])
            obj = obj + (otex * rng.uniform(0.03, 0.2))[..., None]
        img[sl] = img[sl] * (1.0 - alpha) + obj * alpha

    # Global illumination: vignetting and a soft low-frequency light field.
    if rng.random() < 0.7:
        r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.5 * s) ** 2
        img = img * (1.0 - rng.uniform(0.0, 0.35) * r2)[..., None]
    img = img * (1.0 + 0.15 * _smooth_noise(rng, h, w, 3))[..., None]
    return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)


def apply_trace(scene: np.ndarray, trace: CameraTrace, rng: np.random.Generator) -> np.ndarray:
    """Pass a clean float scene [H, W, 3] in [0, 1] (RGB) through a camera; returns uint8 [H, W, 3] RGB.

    Order as in a camera: optics blur, signal-dependent sensor noise (shot noise grows with the
    square root of intensity, plus a read-noise floor), optional spatial correlation of the noise,
    quantisation to 8 bits, JPEG encode/decode at ``trace.jpeg_quality``.
    """
    img = scene * 255.0
    if trace.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), trace.blur_sigma)
    if trace.noise_sigma > 0:
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        if trace.noise_corr > 0:
            noise = cv2.GaussianBlur(noise, (0, 0), trace.noise_corr)
            noise *= 1.0 / float(noise.std() + 1e-6)  # keep the nominal noise level
        level = trace.noise_sigma * (0.35 + 0.65 * np.sqrt(np.clip(img, 0, 255) * (1.0 / 128.0)))
        img = img + noise * level
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if trace.jpeg_quality is not None:
        out = jpeg_roundtrip(out, trace.jpeg_quality)
    return out


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-encode and decode an RGB uint8 image [H, W, 3] at ``quality`` (1-100); same shape back."""
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always has a JPEG encoder in the wheels we use
        raise RuntimeError("OpenCV could not JPEG-encode an image")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def procedural_image(rng: np.random.Generator, size: Size = 256,
                     trace: Optional[CameraTrace] = None) -> np.ndarray:
    """A random natural-ish "photograph": uint8 array [H, W, 3], RGB.

    Args:
        rng: the only source of randomness (a ``numpy.random.Generator``); same state, same bytes.
        size: ``S`` for S x S, or ``(H, W)``.
        trace: the camera trace to apply; ``None`` draws one with :func:`random_trace`.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    scene = procedural_scene(rng, size)
    if trace is None:
        trace = random_trace(rng)
    return apply_trace(scene, trace, rng)
