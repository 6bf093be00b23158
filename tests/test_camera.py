"""The simulated camera and the photo-style generator (fastiml.data.camera, synthesize(style="photo"))."""
import hashlib
import json
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest

from fastiml.data import make_forgery, synthesize
from fastiml.data.camera import (CFA_LAYOUTS, DEMOSAIC, CameraModel, jpeg_save, natural_scene,
                                 pink_noise, random_camera, render)

CLEAN = CameraModel(cfa="RGGB", demosaic="bilinear", shot=0.0, read=0.0, wb=(1.0, 1.0, 1.0),
                    gamma=1.0, contrast=0.0, sharpen=0.0, blur=0.0, jpeg_quality=None,
                    chroma420=True)


@pytest.mark.parametrize("cfa", CFA_LAYOUTS)
@pytest.mark.parametrize("demosaic", DEMOSAIC)
def test_mosaic_and_demosaic_keep_colours(cfa, demosaic):
    # A flat coloured scene through a noiseless camera comes back as that colour for every CFA
    # layout and demosaicing method: the photosite layout matches OpenCV's Bayer codes.
    scene = np.empty((32, 32, 3), np.float32)
    scene[:] = (0.8, 0.3, 0.1)
    out = render(scene, replace(CLEAN, cfa=cfa, demosaic=demosaic), np.random.default_rng(0))
    centre = out[8:24, 8:24].reshape(-1, 3).astype(float)
    np.testing.assert_allclose(centre.mean(0), np.array([0.8, 0.3, 0.1]) * 255, atol=2.0)


def test_noise_grows_with_the_signal():
    cam = replace(CLEAN, shot=0.2, read=0.5)
    rng = np.random.default_rng(1)
    stds = []
    for level in (0.05, 0.3, 0.9):
        out = render(np.full((64, 64, 3), level, np.float32), cam, rng).astype(float)
        stds.append(out[4:-4, 4:-4].std())
    assert stds[0] < stds[1] < stds[2]
    # shot noise: variance ~ shot * signal (+ read^2), on the raw values before demosaicing
    expected = np.sqrt(0.2 * 0.9 * 255 + 0.25)
    assert 0.3 * expected < stds[2] < 1.2 * expected


def test_tone_curve_and_white_balance():
    # The sensor sees the scene through a colour cast (raw = scene / wb); white balance removes
    # it, so a grey scene stays grey, then the tone curve maps linear 0.25 to 0.25 ** (1/gamma).
    cam = replace(CLEAN, gamma=2.0, wb=(1.2, 1.0, 0.8))
    out = render(np.full((16, 16, 3), 0.25, np.float32), cam, np.random.default_rng(0))
    np.testing.assert_allclose(out[8, 8].astype(float), [0.5 * 255] * 3, atol=2.0)
    s_curve = render(np.full((16, 16, 3), 0.25, np.float32), replace(cam, contrast=0.5),
                     np.random.default_rng(0))
    y = 0.5
    assert float(s_curve[8, 8, 1]) == pytest.approx((0.5 * y + 0.5 * y * y * (3 - 2 * y)) * 255, abs=2)


def test_chroma_subsampling_blurs_colour_edges():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 1::2] = (255, 0, 0)  # one-pixel red stripes: pure chroma detail
    err420 = np.abs(jpeg_save(img, 95, True).astype(float) - img).mean()
    err444 = np.abs(jpeg_save(img, 95, False).astype(float) - img).mean()
    assert err420 > 2 * err444


def test_pink_noise_spectrum_slope():
    n = pink_noise(np.random.default_rng(0), 128, 128, alpha=1.0)
    assert abs(float(n.mean())) < 1e-4 and float(n.std()) == pytest.approx(1.0, abs=1e-4)
    amp = np.abs(np.fft.fft2(n))
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij"))
    lo, hi = amp[(f > 0.04) & (f < 0.06)].mean(), amp[(f > 0.36) & (f < 0.44)].mean()
    assert hi / lo == pytest.approx(0.05 / 0.4, rel=0.35)  # amplitude ~ 1/f


def test_cameras_differ_and_scenes_are_reproducible():
    rng = np.random.default_rng(3)
    for _ in range(50):
        a = random_camera(rng)
        b = random_camera(rng, different_from=a)
        qa, qb = a.jpeg_quality or 100, b.jpeg_quality or 100
        assert (max(a.noise_sigma, b.noise_sigma) >= 1.4 * min(a.noise_sigma, b.noise_sigma)
                or abs(qa - qb) >= 12 or a.demosaic != b.demosaic or a.cfa != b.cfa)
    s1 = natural_scene(np.random.default_rng(7), (40, 56))
    s2 = natural_scene(np.random.default_rng(7), (40, 56))
    assert s1.shape == (40, 56, 3) and s1.dtype == np.float32 and np.array_equal(s1, s2)
    assert 0.0 <= s1.min() and s1.max() <= 1.0 and s1.std() > 0.01


def _digest(folder):
    return {os.path.relpath(os.path.join(r, f), folder):
            hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, fs in os.walk(folder) for f in fs}


def test_photo_style_synthesis(tmp_path):
    a = synthesize(tmp_path / "a", 12, size=48, seed=2, style="photo", resave_p=1.0)
    b = synthesize(tmp_path / "b", 12, size=48, seed=2, style="photo", resave_p=1.0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    # every image, authentic ones included, was saved once more
    assert all(any(p.startswith("resave") for p in m["post"]) for m in meta)
    assert sum(m["kind"] == "authentic" for m in meta) == a["counts"]["authentic"] == 2
    with pytest.raises(ValueError, match="style"):
        synthesize(tmp_path / "c", 2, size=48, style="painted")


@pytest.mark.parametrize("kind", ["splice", "copymove"])
def test_photo_edits_change_only_the_region_and_its_feathered_edge(kind):
    rng = np.random.default_rng(5)
    host = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    donor = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    for _ in range(5):
        img, mask, info = make_forgery(kind, host, rng, donor=donor, recompress_p=0,
                                       noise_mismatch_p=0, boundary_blur_p=0, photo_edits=True)
        ring = cv2.dilate(mask, np.ones((9, 9), np.uint8))  # feathering reaches <= ~3 sigma
        assert np.array_equal(img[ring == 0], host[ring == 0])
        assert (img[mask == 1] != host[mask == 1]).any()
        if kind == "splice":
            assert {"angle", "scale", "feather"} <= set(info)
