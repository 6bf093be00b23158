"""fastiml.data.photos: collecting photographs from (unpacked) Debian packages, the demo's crops."""
import os

import cv2
import numpy as np
import pytest

from fastiml.data import photos


@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    """Two packages already unpacked in a cache folder, as apt-get download + dpkg -x leave them."""
    cache = tmp_path / "debs"
    rng = np.random.default_rng(0)
    sets = {"a": [], "b": []}
    for package, name, shape in (("pkg-a", "a", (40, 70)), ("pkg-b", "b", (90, 30))):
        root = cache / package
        (root / "usr/share/doc" / package).mkdir(parents=True)
        (root / "usr/share/doc" / package / "copyright").write_text(f"License: {package}-licence\n")
        (root / "usr/share/pics").mkdir(parents=True)
        for k in range(2):
            path = f"usr/share/pics/{name}{k}.png"
            cv2.imwrite(str(root / path), rng.integers(0, 256, shape + (3,), dtype=np.uint8))
            sets[name].append((package, path))
    monkeypatch.setattr(photos, "PHOTO_SETS", sets)
    monkeypatch.setattr(photos, "TRAINING_SETS", ("a", "b"))
    monkeypatch.setattr(photos, "KEEP", 32)
    return cache


def test_collect_copies_bytes_and_licences(fake_archive, tmp_path):
    out = photos.collect("a", tmp_path / "out" / "a" / "images", fake_archive)
    assert sorted(os.listdir(out)) == ["a0.png", "a1.png"]
    src = fake_archive / "pkg-a/usr/share/pics/a0.png"
    assert (out / "a0.png").read_bytes() == src.read_bytes()
    licences = (tmp_path / "out" / "a" / "LICENSES.txt").read_text()
    assert "pkg-a-licence" in licences and "a1.png" in licences


def test_training_photos_are_central_native_crops(fake_archive, tmp_path):
    flat = photos.training_photos(tmp_path / "cache", cache=fake_archive, log=lambda s: None)
    assert sorted(os.listdir(flat)) == ["a_a0.png", "a_a1.png", "b_b0.png", "b_b1.png"]
    src = cv2.imread(str(fake_archive / "pkg-b/usr/share/pics/b0.png"))
    crop = cv2.imread(str(flat / "b_b0.png"))
    assert crop.shape == (32, 30, 3)  # at most KEEP per side, the photograph's own pixels
    assert np.array_equal(crop, src[29:61, :32])
    # fetched once: a second call reads the folder and needs no archive
    assert photos.training_photos(tmp_path / "cache", cache=tmp_path / "gone", log=lambda s: None) == flat


def test_no_apt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(photos, "PHOTO_SETS", {"a": [("pkg-missing", "usr/share/x.png")]})
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on it
    with pytest.raises(photos.PhotoFetchError, match="apt-get download pkg-missing"):
        photos.collect("a", tmp_path / "out", tmp_path / "debs")


def test_demo_names_the_way_out_when_photos_cannot_be_fetched(tmp_path, monkeypatch, capsys):
    from fastiml import cli

    def no_photos(**kw):
        raise photos.PhotoFetchError("apt-get download x failed: no network")
    monkeypatch.setattr(photos, "training_photos", no_photos)
    with pytest.raises(cli.CLIError, match="demo.photos=false"):
        cli._demo_photos()
