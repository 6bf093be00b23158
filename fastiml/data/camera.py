"""A simulated digital camera, and natural-looking scenes for it: the "photo" style of the
built-in generator.

What a camera leaves on every pixel of a photograph, in the order it happens (DESIGN section 10):

1. optics blur;
2. a colour filter array (Bayer mosaic: one colour per photosite, in one of the four layouts);
3. signal-dependent sensor noise on the mosaic (shot noise, variance proportional to the signal,
   plus a read-noise floor);
4. demosaicing (OpenCV's bilinear, VNG or edge-aware interpolation): the periodic inter-channel
   correlations a forensic network can check;
5. white balance, a tone curve (gamma and an S-curve), unsharp-mask sharpening;
6. 8-bit quantisation and JPEG with 4:2:0 (or 4:4:4) chroma subsampling, or no compression.

Two cameras drawn with :func:`random_camera` (``different_from=``) differ clearly, so a region
spliced from one image into another carries foreign traces.

:func:`natural_scene` draws a scene with the statistics of natural images: a "dead leaves"
occlusion model (objects of power-law sizes covering each other), textures with a 1/f amplitude
spectrum, shading by a light direction, defocus on some objects and soft illumination; it
returns linear light. Everything is a pure function of the numpy Generator passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

__all__ = ["CameraModel", "random_camera", "render", "natural_scene", "pink_noise", "jpeg_save"]

CFA_LAYOUTS = ("RGGB", "BGGR", "GRBG", "GBRG")
DEMOSAIC = ("bilinear", "vng", "ea")
_CFA_OFFSETS = {"RGGB": ((0, 0), (1, 1)), "BGGR": ((1, 1), (0, 0)), "GRBG": ((0, 1), (1, 0)),
                "GBRG": ((1, 0), (0, 1))}  # (row, col) of R and of B in the 2x2 cell


@dataclass(frozen=True)
class CameraModel:
    """One simulated camera (and the settings it saved the image with).

    Attributes:
        cfa: Bayer layout, one of ``CFA_LAYOUTS``. demosaic: one of ``DEMOSAIC``.
        shot: shot-noise gain: variance ``shot * x`` at signal x (8-bit levels, before gamma).
        read: read-noise std (8-bit levels).
        wb: white-balance gains (R, G, B) applied after demosaicing.
        gamma: tone-curve exponent (output = linear ** (1 / gamma)). contrast: S-curve strength.
        sharpen: unsharp-mask amount (0 = none). blur: optics blur std (pixels).
        jpeg_quality: quality of the saved JPEG, or None (lossless). chroma420: JPEG 4:2:0 (else 4:4:4).
    """

    cfa: str
    demosaic: str
    shot: float
    read: float
    wb: Tuple[float, float, float]
    gamma: float
    contrast: float
    sharpen: float
    blur: float
    jpeg_quality: Optional[int]
    chroma420: bool

    @property
    def noise_sigma(self) -> float:
        """Noise std at mid-grey in 8-bit levels (what :func:`fastiml.data.make_forgery` scales to)."""
        return math.sqrt(self.shot * 128.0 + self.read ** 2)


def random_camera(rng: np.random.Generator, different_from: Optional[CameraModel] = None) -> CameraModel:
    """Draw a camera; with ``different_from``, one whose noise level differs by >= 40 % or whose
    JPEG quality differs by >= 12 (None counts as 100), or with another demosaicing / CFA."""
    for _ in range(100):
        cam = CameraModel(
            cfa=str(rng.choice(CFA_LAYOUTS)),
            demosaic=str(rng.choice(DEMOSAIC)),
            shot=float(rng.uniform(0.005, 0.25)),
            read=float(rng.uniform(0.3, 2.5)),
            wb=tuple(float(g) for g in (rng.uniform(0.85, 1.25), 1.0, rng.uniform(0.85, 1.25))),
            gamma=float(rng.uniform(1.8, 2.4)),
            contrast=float(rng.uniform(0.0, 0.6)),
            sharpen=float(rng.choice([0.0, rng.uniform(0.2, 1.2)])),
            blur=float(rng.choice([0.0, rng.uniform(0.3, 0.8)])),
            jpeg_quality=None if rng.random() < 0.15 else int(rng.integers(65, 99)),
            chroma420=bool(rng.random() < 0.8),
        )
        if different_from is None or _clearly_different(cam, different_from):
            return cam
    raise RuntimeError("random_camera could not draw a clearly different camera")  # pragma: no cover


def _clearly_different(a: CameraModel, b: CameraModel) -> bool:
    qa, qb = a.jpeg_quality or 100, b.jpeg_quality or 100
    na, nb = a.noise_sigma, b.noise_sigma
    return (max(na, nb) >= 1.4 * min(na, nb) or abs(qa - qb) >= 12
            or a.demosaic != b.demosaic or a.cfa != b.cfa)


def _demosaic_code(cfa: str, method: str) -> int:
    suffix = {"bilinear": "", "vng": "_VNG", "ea": "_EA"}[method]
    return getattr(cv2, f"COLOR_Bayer{cfa}2RGB{suffix}")


def jpeg_save(img: np.ndarray, quality: int, chroma420: bool = True) -> np.ndarray:
    """JPEG-encode and decode an RGB uint8 image at ``quality`` with 4:2:0 or 4:4:4 chroma."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420 if chroma420 else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), params)
    if not ok:  # pragma: no cover
        raise RuntimeError("OpenCV could not JPEG-encode an image")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def render(scene: np.ndarray, cam: CameraModel, rng: np.random.Generator) -> np.ndarray:
    """Photograph a linear-light scene float32 [H, W, 3] in [0, 1] (RGB) with ``cam``; uint8 RGB."""
    h, w = scene.shape[:2]
    x = scene.astype(np.float32) * 255.0
    if cam.blur > 0:
        x = cv2.GaussianBlur(x, (0, 0), cam.blur)
    # Raw: the sensor sees the scene before white balance (divide the gains out, put back later).
    x = x / np.asarray(cam.wb, np.float32)
    r_off, b_off = _CFA_OFFSETS[cam.cfa]
    raw = x[..., 1].copy()  # green everywhere, then R and B photosites
    raw[r_off[0]::2, r_off[1]::2] = x[r_off[0]::2, r_off[1]::2, 0]
    raw[b_off[0]::2, b_off[1]::2] = x[b_off[0]::2, b_off[1]::2, 2]
    sigma = np.sqrt(cam.shot * np.clip(raw, 0, None) + cam.read ** 2)
    raw = raw + rng.standard_normal(raw.shape, dtype=np.float32) * sigma
    raw8 = np.clip(raw + 0.5, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(raw8, _demosaic_code(cam.cfa, cam.demosaic)).astype(np.float32) * (1.0 / 255.0)
    rgb = np.clip(rgb * np.asarray(cam.wb, np.float32), 0.0, 1.0)
    y = rgb ** (1.0 / cam.gamma)
    if cam.contrast > 0:
        y = (1.0 - cam.contrast) * y + cam.contrast * (y * y * (3.0 - 2.0 * y))
    if cam.sharpen > 0:
        y = y + cam.sharpen * (y - cv2.GaussianBlur(y, (0, 0), 1.0))
    out = np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if cam.jpeg_quality is not None:
        out = jpeg_save(out, cam.jpeg_quality, cam.chroma420)
    return out


# ----------------------------------------------------------------------------------------------
# Natural scenes
# ----------------------------------------------------------------------------------------------
def pink_noise(rng: np.random.Generator, h: int, w: int, alpha: float = 1.0) -> np.ndarray:
    """Float32 [h, w] noise with amplitude spectrum 1/f**alpha, zero mean, unit std."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** alpha
    spec[0, 0] = 0.0
    n = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
    return n / float(n.std() + 1e-8)


def _colour(rng: np.random.Generator) -> np.ndarray:
    # Natural colours are mostly desaturated; a few are vivid. Drawn as display values, returned
    # in linear light.
    c = rng.uniform(0.02, 0.95, 3)
    grey = c.mean()
    c = np.clip(grey + (c - grey) * rng.uniform(0.1, 1.0), 0.0, 1.0) * rng.uniform(0.3, 1.0)
    return (c ** 2.2).astype(np.float32)


def natural_scene(rng: np.random.Generator, size) -> np.ndarray:
    """A dead-leaves scene in linear light: float32 [H, W, 3] in [0, 1], RGB.

    Objects (discs, ellipses, polygons, rectangles, strokes) with radii drawn from a power law
    (density ~ r^-2.5, near the r^-3 of scale-invariant dead leaves, with fewer specks) are painted back to front, each
    with its colour modulated by a 1/f texture and shaded by one light direction; some are
    defocused (depth of field); the whole is lit by a soft low-frequency illumination field.
    """
    from .procedural import _hw

    h, w = _hw(size)
    s = float(max(h, w))
    textures = [pink_noise(rng, h, w, float(rng.uniform(0.8, 1.6))) for _ in range(3)]
    img = _colour(rng) * (1.0 + 0.3 * textures[0][..., None] * rng.uniform(0.2, 1.0))
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    light = rng.uniform(0, 2 * np.pi)
    layer = np.zeros((h, w), np.uint8)
    rmin, rmax = 0.015 * s, 0.6 * s
    n_obj = int(rng.integers(40, 120))
    for k in range(n_obj):
        u = rng.random()
        r = (rmin ** -1.5 - u * (rmin ** -1.5 - rmax ** -1.5)) ** (-1 / 1.5)  # density ~ r^-2.5
        cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        layer[:] = 0
        shape = rng.integers(0, 5)
        if shape == 0:
            cv2.circle(layer, (int(cx * 16), int(cy * 16)), int(r * 16), 255, -1, cv2.LINE_AA, 4)
        elif shape == 1:
            cv2.ellipse(layer, ((cx, cy), (2 * r, 2 * r * rng.uniform(0.2, 1.0)), rng.uniform(0, 180)),
                        255, -1, cv2.LINE_AA)
        elif shape == 2:
            n = int(rng.integers(3, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.4, 1.0, n)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
            cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        elif shape == 3:
            pts = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.1, 1.0)), rng.uniform(0, 180)))
            cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        else:  # a stroke: branch, pole, wire
            a = rng.uniform(0, np.pi)
            d = np.array([math.cos(a), math.sin(a)]) * r * 2
            cv2.line(layer, (int((cx - d[0]) * 16), int((cy - d[1]) * 16)),
                     (int((cx + d[0]) * 16), int((cy + d[1]) * 16)), 255,
                     max(1, int(r * rng.uniform(0.05, 0.3))), cv2.LINE_AA, 4)
        x0, y0, bw, bh = cv2.boundingRect(layer)
        if bw == 0 or bh == 0:
            continue
        sl = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        alpha = layer[sl].astype(np.float32) * (1.0 / 255.0)
        if k < n_obj // 2 and rng.random() < 0.3:  # far objects: out of focus
            alpha = cv2.GaussianBlur(alpha, (0, 0), float(rng.uniform(0.8, 3.0)))
        tex = textures[int(rng.integers(1, 3))][sl]
        ramp = (math.cos(light) * (xx[:, sl[1]] - cx) + math.sin(light) * (yy[sl[0]] - cy)) / max(r, 1.0)
        shade = 1.0 + rng.uniform(0.1, 0.5) * np.clip(ramp, -1.5, 1.5)
        obj = _colour(rng) * (shade * (1.0 + tex * rng.uniform(0.05, 0.6)))[..., None]
        img[sl] = img[sl] * (1.0 - alpha[..., None]) + obj * alpha[..., None]
    illum = np.exp(0.35 * cv2.resize(rng.standard_normal((3, 3)).astype(np.float32), (w, h),
                                      interpolation=cv2.INTER_CUBIC))
    img = img * illum[..., None] * rng.uniform(0.5, 1.2)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
