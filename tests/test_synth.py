"""Synthetic forgeries and the procedural image source."""
import hashlib
import json
import os

import cv2
import numpy as np
import pytest

from fastiml.data import (ForgeryDataset, make_forgery, procedural_image, random_region, random_trace,
                          synthesize)
from fastiml.data.procedural import CameraTrace, _clearly_different, apply_trace


def _digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, n_images=24, size=64, seed=3, authentic_fraction=0.25)
    return out, summary


def test_layout_and_counts(synth_dir):
    out, summary = synth_dir
    assert summary["counts"]["authentic"] == 6  # round(24 * 0.25)
    kinds = [summary["counts"][k] for k in ("splice", "copymove", "inpaint")]
    assert sum(kinds) == 18 and max(kinds) - min(kinds) <= 1
    pairs = json.loads((out / "list.json").read_text())
    assert len(pairs) == 24 and summary["json"] == str(out / "list.json")
    assert sum(m == "Negative" for _, m in pairs) == 6
    for img, m in pairs:
        assert (out / img).is_file()
        if m != "Negative":
            assert (out / m).is_file() and os.path.splitext(os.path.basename(m))[0] == \
                os.path.splitext(os.path.basename(img))[0]
    assert len(os.listdir(out / "Tp")) == len(os.listdir(out / "Gt")) == 18
    assert len(os.listdir(out / "Au")) == 6


def test_masks_binary_and_area_in_bounds(synth_dir):
    out, summary = synth_dir
    for it in summary["items"]:
        if it["kind"] == "authentic":
            continue
        m = cv2.imread(str(out / it["mask"]), cv2.IMREAD_UNCHANGED)
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
        frac = (m > 0).mean()
        assert 0.05 <= frac <= 0.5 and frac == pytest.approx(it["area"])


def test_reproducible_bytes(tmp_path, synth_dir):
    out, _ = synth_dir
    again = synthesize(tmp_path / "again", n_images=24, size=64, seed=3, authentic_fraction=0.25)
    assert _digest(out) == _digest(again["out_dir"])
    other = synthesize(tmp_path / "other", n_images=24, size=64, seed=4, authentic_fraction=0.25)
    assert _digest(out) != _digest(other["out_dir"])
    # Re-running into the same folder with fewer images leaves no stale files behind
    # (images, masks, list.json and meta.json).
    synthesize(tmp_path / "other", n_images=5, size=64, seed=4)
    assert sum(len(fs) for _, _, fs in os.walk(tmp_path / "other")) == 5 + sum(
        m != "Negative" for _, m in json.loads((tmp_path / "other" / "list.json").read_text())) + 2


def test_loads_back_through_dataset(synth_dir):
    out, summary = synth_dir
    from_json = ForgeryDataset(out / "list.json", size=32)
    from_folder = ForgeryDataset(out, size=32)
    assert len(from_json) == len(from_folder) == 24 and not from_json.skipped
    assert sorted(from_json.samples) == sorted(from_folder.samples)
    labels = [from_json[i]["label"].item() for i in range(len(from_json))]
    assert sum(labels) == 18
    for i in range(len(from_json)):
        item = from_json[i]
        assert item["size"].tolist() == [64, 64]
        assert item["label"].item() == int(item["mask"].sum() > 0)


def test_area_argument_and_kinds(tmp_path):
    s = synthesize(tmp_path, n_images=6, size=48, seed=0, kinds=("inpaint",), authentic_fraction=0,
                   area=(0.2, 0.25))
    assert s["counts"] == {"inpaint": 6, "authentic": 0}
    for it in s["items"]:
        assert 0.2 <= it["area"] <= 0.25


def test_random_region_bounds():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        for shape in ("polygon", "bezier"):
            m = random_region(rng, (50, 70), (0.05, 0.5), shape=shape)
            assert m.shape == (50, 70) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
            assert 0.05 <= m.mean() <= 0.5
    with pytest.raises(ValueError, match="area must satisfy"):
        random_region(np.random.default_rng(0), 32, (0.5, 0.1))


@pytest.mark.parametrize("kind", ["splice", "copymove", "inpaint"])
def test_forgery_changes_only_the_region(kind):
    rng = np.random.default_rng(11)
    trace = random_trace(rng)
    host = procedural_image(rng, 64, trace)
    donor = procedural_image(rng, 64, random_trace(rng, different_from=trace))
    img, mask, info = make_forgery(kind, host, np.random.default_rng(5), donor=donor,
                                   recompress_p=0, noise_mismatch_p=0, boundary_blur_p=0)
    inside, outside = mask.astype(bool), ~mask.astype(bool)
    assert np.array_equal(img[outside], host[outside])
    assert (img[inside] != host[inside]).any(axis=-1).mean() > 0.5
    if kind == "splice":
        src = donor[:, ::-1] if info["flip"] else donor
        assert np.array_equal(img[inside], src[inside])
    # With boundary blur the mask stays the hard region; only a thin band outside it may change.
    img2, mask2, info2 = make_forgery(kind, host, np.random.default_rng(5), donor=donor, host_trace=trace,
                                      recompress_p=1, noise_mismatch_p=1, boundary_blur_p=1)
    assert np.array_equal(mask2, mask) and len(info2["post"]) == 3
    far = cv2.dilate(mask, np.ones((9, 9), np.uint8)) == 0
    assert np.array_equal(img2[far], host[far])
    assert not np.array_equal(img2[~far], host[~far])


def test_traces_differ_for_splices():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = random_trace(rng)
        b = random_trace(rng, different_from=a)
        assert _clearly_different(a, b)


def test_trace_mismatch_is_measurable():
    """On a flat scene, a splice between two traces shows up in the noise residual (learnability)."""
    flat = np.full((96, 96, 3), 0.5, np.float32)
    low = CameraTrace(noise_sigma=1.0, noise_corr=0.0, blur_sigma=0.0, jpeg_quality=None)
    high = CameraTrace(noise_sigma=6.0, noise_corr=0.0, blur_sigma=0.0, jpeg_quality=90)
    for host_t, donor_t in ((low, high), (high, low)):
        rng = np.random.default_rng(0)
        host, donor = apply_trace(flat, host_t, rng), apply_trace(flat, donor_t, rng)
        img, mask, _ = make_forgery("splice", host, rng, donor=donor, area=(0.3, 0.4), recompress_p=0,
                                    noise_mismatch_p=0, boundary_blur_p=0)
        g = img.astype(np.float32).mean(-1)
        resid = np.abs(g - cv2.GaussianBlur(g, (0, 0), 1.0))
        inner = cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)
        outer = cv2.dilate(mask, np.ones((5, 5), np.uint8)) == 0
        ratio = resid[inner].mean() / resid[outer].mean()
        assert ratio > 2.5 if donor_t is high else ratio < 1 / 2.5


def test_procedural_is_reproducible():
    a = procedural_image(np.random.default_rng(9), (40, 56))
    b = procedural_image(np.random.default_rng(9), (40, 56))
    assert a.shape == (40, 56, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.std() > 5  # not a flat image
    assert not np.array_equal(a, procedural_image(np.random.default_rng(10), (40, 56)))


def test_source_dir_and_bad_args(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f"p{i}.png"), procedural_image(np.random.default_rng(i), (50, 80)))
    s = synthesize(tmp_path / "out", n_images=6, size=40, seed=1, source_dir=src, authentic_fraction=0.5)
    assert s["counts"]["authentic"] == 3 and len(ForgeryDataset(s["json"], size=16)) == 6
    one = tmp_path / "one"
    one.mkdir()
    cv2.imwrite(str(one / "p.png"), procedural_image(np.random.default_rng(0), 40))
    with pytest.raises(ValueError, match="at least 2 images"):
        synthesize(tmp_path / "x", n_images=2, size=32, source_dir=one)
    with pytest.raises(ValueError, match="kinds"):
        synthesize(tmp_path / "x", n_images=2, kinds=("blur",))
    with pytest.raises(ValueError, match="n_images"):
        synthesize(tmp_path / "x", n_images=0)
    with pytest.raises(ValueError, match="authentic_fraction"):
        synthesize(tmp_path / "x", n_images=2, authentic_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        synthesize(tmp_path / "x", n_images=2, seed=-1)
