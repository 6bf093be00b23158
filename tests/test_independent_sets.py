"""benchmarks/independent_sets.py: the development set forged with OpenCV, not fastiml's code.

Built from three random-texture "photographs" made here (no apt, no network): the list loads
with ``fastiml.data.ForgeryDataset`` and ``fastiml eval`` finds every image's kind; masks are
non-empty exactly for the forged kinds and match what changed; the forging leaves the pixels
outside the mask alone (exactly, or for Poisson by a smooth offset inside the mask's box only);
a seed gives the same bytes; and neither building nor importing loads fastiml's forging modules.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks import independent_sets as ind

ROOT = Path(__file__).resolve().parents[1]
FORGED = ("splice", "copymove", "inpaint")


def _texture(rng, h, w):
    """Smoothed noise at two scales plus a colour ramp: a stand-in photograph, kept off 0 and
    255 (a Poisson offset clipped there would not be smooth)."""
    coarse = cv2.resize(rng.uniform(30, 160, (h // 16, w // 16, 3)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.normal(0, 12, (h, w, 3)).astype(np.float32), (0, 0), 0.8)
    ramp = np.linspace(0, 40, w, dtype=np.float32)[None, :, None]
    return np.clip(coarse + fine + ramp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(123)
    for i, (h, w) in enumerate([(300, 400), (260, 260), (420, 340)]):
        cv2.imwrite(str(folder / f"p{i}.{'png' if i else 'jpg'}"), _texture(rng, h, w))
    return folder


def _build(photos, out, seed=3, per_kind=6):
    assert ind.main(["--out", str(out), "--images", str(photos), "--seed", str(seed),
                     "--per-kind", str(per_kind)]) == 0
    return out / "independent"


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory):
    return _build(photos, tmp_path_factory.mktemp("out"))


def test_list_loads_and_kinds_are_found(built):
    from fastiml.cli import _synth_kinds  # what `fastiml eval` uses for its by_kind figures
    from fastiml.data import ForgeryDataset

    ds = ForgeryDataset(str(built / "list.json"), size=64, on_error="raise")
    assert len(ds) == 4 * 6
    kinds = _synth_kinds(str(built / "list.json"))
    assert len(kinds) == 24
    by_kind = {k: sum(v == k for v in kinds.values()) for k in ind.KINDS}
    assert by_kind == dict.fromkeys(ind.KINDS, 6)
    for i, (img_path, _) in enumerate(ds.samples):
        kind = kinds[os.path.normpath(img_path)]
        mask = ds.read_item(i)["mask"]
        if kind == "authentic":
            assert mask.sum() == 0 and ds.labels[i] == 0, img_path
        else:
            assert ds.labels[i] == 1 and mask.mean() > 0.01, (img_path, float(mask.mean()))
    summary = json.loads((built / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["counts"] == dict.fromkeys(ind.KINDS, 6)


def test_saved_images_match_masks(built, photos):
    """PNG items cut from an unscaled photograph: outside the mask's bounding box the pixels are
    the photograph's, inside the mask they are not; authentic PNGs are the crop itself."""
    meta = json.loads((built / "meta.json").read_text())
    checked = set()
    for it in meta:
        assert (it["donor"] is not None and it["donor"] != it["host"]) == (it["kind"] == "splice")
        if it["format"] != "png" or it["downscale"] != 1.0:
            continue
        y, x, h, w = it["box"]
        host = ind.read_photo(photos / it["host"])[y:y + h, x:x + w].astype(int)
        img = ind.read_photo(built / it["image"]).astype(int)
        if it["kind"] == "authentic":
            assert np.array_equal(img, host)
        else:
            mask = cv2.imread(str(built / it["mask"]), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(mask)) == {0, 255}
            bx, by, bw, bh = cv2.boundingRect(mask)
            outside = np.ones(mask.shape, bool)
            outside[by:by + bh, bx:bx + bw] = False
            assert np.array_equal(img[outside], host[outside]), it["image"]
            assert np.abs(img - host).max(axis=2)[mask > 0].mean() > 1.0, it["image"]
        checked.add(it["kind"])
    assert len(checked) >= 3, f"too few PNG items to check: {checked}"  # the seed gives enough


def _host(seed):
    return _texture(np.random.default_rng(seed), 240, 300)


@pytest.mark.parametrize("kind", FORGED)
def test_forgery_changes_the_mask_only(kind):
    donor = _texture(np.random.default_rng(99), 400, 380)
    blends = set()
    for seed in range(24):
        host = _host(seed)
        img, mask, info = ind.forge(kind, host, np.random.default_rng(seed), donor_photo=donor)
        assert img.shape == host.shape and img.dtype == np.uint8
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert ind.AREA[0] <= mask.mean() <= ind.AREA[1]
        change = img.astype(np.float32) - host
        inside = mask.astype(bool)
        assert np.abs(change).max(axis=2)[inside].mean() > 2.0, info
        blend = info["blend"].rstrip("0123456789.")
        blends.add(blend)
        if not blend.startswith("poisson"):
            assert np.array_equal(img[~inside], host[~inside]), info
            if blend == "feather":  # soft edge: the region's rim changes far less than its core
                core = cv2.erode(mask, np.ones((25, 25), np.uint8)).astype(bool)
                rim = inside & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
                if core.any():
                    diff = np.abs(change).max(axis=2)
                    assert diff[rim].mean() < 0.3 * diff[core].mean(), info
            continue
        # OpenCV's Poisson solve: nothing outside the region's box moves, and inside the box
        # the host pixels (2+ px off the region) move by a smooth offset: the change's detail
        # (minus its blur) there is rounding (~0.35 levels), in the region the donor's (3-7)
        x, y, bw, bh = cv2.boundingRect(mask)
        box = np.zeros_like(inside)
        box[y:y + bh, x:x + bw] = True
        assert np.array_equal(img[~box], host[~box]), info
        off = ~cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool)
        detail = np.abs(change - cv2.GaussianBlur(change, (0, 0), 2)).max(axis=2)
        assert detail[off & box].mean() < 0.6 and detail[inside].mean() > 2.0, info
    want = {"inpaint-telea", "inpaint-ns"} if kind == "inpaint" else \
        {"poisson-normal", "poisson-mixed", "feather"}
    assert blends == want


def test_authentic_is_the_crop():
    host = _host(0)
    img, mask, _ = ind.forge("authentic", host, np.random.default_rng(0))
    assert np.array_equal(img, host) and not mask.any()


def test_regions():
    for seed in range(40):
        m = ind.random_region(np.random.default_rng(seed), 200, 320)
        assert m.shape == (200, 320) and ind.AREA[0] <= m.mean() <= ind.AREA[1]
        assert not (m[:2].any() or m[-2:].any() or m[:, :2].any() or m[:, -2:].any())
    with pytest.raises(ValueError, match="area"):
        ind.random_region(np.random.default_rng(0), 64, 64, area=(0.3, 0.1))


def test_deterministic_for_a_seed(photos, tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "summary.json"}

    a = files(_build(photos, tmp_path / "a", seed=5, per_kind=2))
    b = files(_build(photos, tmp_path / "b", seed=5, per_kind=2))
    c = files(_build(photos, tmp_path / "c", seed=6, per_kind=2))
    assert a == b
    assert a["meta.json"] != c["meta.json"]
    assert sum(a[k] != c.get(k) for k in a if k.startswith(("Tp/", "Au/"))) >= 6


def test_no_fastiml_forging_code():
    """Building the set in a fresh process loads none of fastiml's forging modules."""
    code = ("import sys, tempfile, cv2, numpy as np\n"
            "from benchmarks import independent_sets as m\n"
            "d = tempfile.mkdtemp()\n"
            "rng = np.random.default_rng(0)\n"
            "for i in range(2):\n"
            "    cv2.imwrite(f'{d}/p{i}.png', rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))\n"
            "m.main(['--out', d, '--images', d, '--per-kind', '2', '--sizes', '64'])\n"
            "print(sorted(k for k in sys.modules if k.startswith('fastiml')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.strip().splitlines()[-1]
    for name in ("fastiml.data.synth", "fastiml.data.procedural", "fastiml.data.camera"):
        assert f"'{name}'" not in loaded, loaded
    assert loaded == "[]", loaded  # not even fastiml.data, whose package imports them


def test_bad_arguments(photos, tmp_path):
    with pytest.raises(ValueError, match="per_kind"):
        ind.build(photos, tmp_path / "x", per_kind=0)
    with pytest.raises(ValueError, match="sizes"):
        ind.build(photos, tmp_path / "x", sizes=[8])
    one = tmp_path / "one"
    one.mkdir()
    cv2.imwrite(str(one / "a.png"), _host(0))
    with pytest.raises(ValueError, match="at least 2 photographs"):
        ind.build(one, tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        ind.main(["--out", str(tmp_path), "--images", str(tmp_path / "missing")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="kind must be one of"):
        ind.forge("copy-move", _host(0), np.random.default_rng(0))
