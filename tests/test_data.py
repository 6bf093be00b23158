"""Readers, resize / pad, validation of bad files, augmentations, degradations, balanced sampling."""
import json
import os
import warnings
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from fastiml.data import (ROBUSTNESS_PROTOCOL, Augment, BalancedSampler, Degrade, ForgeryDataset, degrade,
                          image_size, read_mask, resize_or_pad)


def _write(path, arr):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if arr.ndim == 3:
        arr = arr[..., ::-1]  # RGB -> BGR for OpenCV
    assert cv2.imwrite(path, np.ascontiguousarray(arr)), path


def _pair(h=20, w=30, seed=0):
    """An RGB image whose red channel encodes its (asymmetric) mask, so alignment is checkable."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    mask[2:9, 3:20] = 1
    mask[9:15, 3:7] = 1  # an L shape: no flip / rotation maps it onto itself
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 0] = mask * 255
    return img, mask


@pytest.fixture
def json_source(tmp_path):
    img, mask = _pair()
    _write(tmp_path / "data" / "imgs" / "a.png", img)
    _write(tmp_path / "data" / "masks" / "a.png", mask * 255)
    auth = np.full((25, 15, 3), 77, np.uint8)
    _write(tmp_path / "data" / "imgs" / "b.png", auth)
    lst = tmp_path / "data" / "list.json"
    lst.write_text(json.dumps([["imgs/a.png", "masks/a.png"], ["imgs/b.png", "Negative"]]))
    return lst, img, mask, auth


def test_json_reader_resize_roundtrip(json_source, tmp_path, monkeypatch):
    lst, img, mask, auth = json_source
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the JSON's folder, not the cwd
    ds = ForgeryDataset(str(lst), size=20, mode="resize")
    assert len(ds) == 2
    a = ds[0]
    assert a["image"].shape == (3, 20, 20) and a["image"].dtype == torch.float32
    assert a["mask"].shape == (20, 20) and a["mask"].dtype == torch.float32
    assert a["valid"].dtype == torch.bool and bool(a["valid"].all())
    assert a["label"].dtype == torch.int64 and a["label"].item() == 1
    assert a["name"] == "a.png" and a["size"].tolist() == [20, 30]
    assert set(a["mask"].unique().tolist()) == {0.0, 1.0}
    # The mask followed the image through the resize (red channel encodes it).
    red = a["image"][0] > 0.5
    assert (red == (a["mask"] > 0)).float().mean() > 0.97
    b = ds[1]
    assert b["label"].item() == 0 and b["mask"].sum() == 0 and b["size"].tolist() == [25, 15]
    assert torch.allclose(b["image"], torch.full((3, 20, 20), 77 / 255))


def test_identity_resize_is_exact(json_source):
    lst, img, mask, _ = json_source
    ds = ForgeryDataset([[str(lst.parent / "imgs" / "a.png"), str(lst.parent / "masks" / "a.png")]],
                        size=30, mode="pad")
    it = ds[0]
    assert torch.equal(it["image"][:, :20, :30], torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    assert torch.equal(it["mask"][:20], torch.from_numpy(mask).float())


def test_pad_mode_valid_map(json_source):
    lst, *_ = json_source
    ds = ForgeryDataset(lst, size=40, mode="pad")
    a = ds[0]  # 20 x 30: padded, not scaled
    assert a["valid"][:20, :30].all() and not a["valid"][20:].any() and not a["valid"][:, 30:].any()
    assert a["image"][:, 20:].abs().sum() == 0 and a["mask"][20:].sum() == 0
    small = ForgeryDataset(lst, size=10, mode="pad")  # larger than size: downscaled to fit, aspect kept
    a = small[0]
    assert a["image"].shape == (3, 10, 10)
    assert a["valid"].sum() == 10 * 7 and a["valid"][:7, :10].all()  # 20x30 -> 7x10 (rounded)
    assert not (a["mask"] * ~a["valid"]).any()


def test_resize_or_pad_function():
    img, mask = _pair(31, 17)
    for mode in ("resize", "pad"):
        o, m, v = resize_or_pad(img, mask, 64, mode)
        assert o.shape == (64, 64, 3) and m.shape == (64, 64) and v.shape == (64, 64) and v.dtype == bool
        assert set(np.unique(m)) <= {0, 1}
    assert v.sum() == 31 * 17
    with pytest.raises(ValueError, match="mode must be 'resize', 'pad' or 'native'"):
        resize_or_pad(img, mask, 64, "crop")
    with pytest.raises(ValueError, match="mask must be an array"):
        resize_or_pad(img, mask[:5], 64)


def test_folder_layout(tmp_path):
    img, mask = _pair()
    _write(tmp_path / "Tp" / "x1.jpg", img)
    _write(tmp_path / "Gt" / "x1.png", mask * 255)
    _write(tmp_path / "Tp" / "x2.png", img)
    _write(tmp_path / "Gt" / "x2_gt.bmp", mask * 255)  # CASIA-style suffix, other extension
    _write(tmp_path / "Au" / "y.png", img)
    (tmp_path / "Tp" / "notes.txt").write_text("not an image")
    ds = ForgeryDataset(tmp_path, size=16)
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["x1.jpg", "x2.png", "y.png"]
    assert ds.labels == [1, 1, 0]
    assert [ds[i]["label"].item() for i in range(3)] == [1, 1, 0]
    # A list of sources concatenates them.
    both = ForgeryDataset([tmp_path, tmp_path], size=16)
    assert len(both) == 6


def test_mask_conventions(tmp_path):
    m = np.zeros((10, 12), np.uint8)
    m[:, :5] = 1
    _write(tmp_path / "m01.png", m)  # 0/1 mask
    assert np.array_equal(read_mask(tmp_path / "m01.png"), m)
    red = np.zeros((10, 12, 3), np.uint8)
    red[:, :5, 0] = 255
    _write(tmp_path / "red.png", red)  # colour mask: red on black
    assert np.array_equal(read_mask(tmp_path / "red.png"), m)
    _write(tmp_path / "m16.png", m.astype(np.uint16) * 65535)  # 16-bit masks, both conventions
    assert np.array_equal(read_mask(tmp_path / "m16.png"), m)
    _write(tmp_path / "m16b.png", m.astype(np.uint16))
    assert np.array_equal(read_mask(tmp_path / "m16b.png"), m)
    big = np.zeros((100, 100), np.uint8)
    big[:50] = 255
    big[50, :50] = 100  # 0.5 % intermediate, like a JPEG-compressed mask's edge ring
    _write(tmp_path / "jpegish.png", big)
    assert read_mask(tmp_path / "jpegish.png").sum() == 50 * 100
    big[50:60] = 100  # 10 % intermediate: non-binary
    _write(tmp_path / "grey.png", big)
    with pytest.raises(ValueError, match="grey.png"):
        read_mask(tmp_path / "grey.png")


def _bad_cases(tmp_path):
    """(source, offending file name) for every kind of bad pair; each source also has a good pair."""
    img, mask = _pair()
    good_img, good_mask = tmp_path / "good.png", tmp_path / "good_m.png"
    _write(good_img, img)
    _write(good_mask, mask * 255)
    good = [str(good_img), str(good_mask)]
    cases = {}
    cases["missing_mask"] = ([good, [str(good_img), str(tmp_path / "nomask.png")]], "nomask.png")
    cases["missing_image"] = ([good, [str(tmp_path / "noimg.png"), str(good_mask)]], "noimg.png")
    _write(tmp_path / "small_m.png", mask[:10] * 255)
    cases["size_mismatch"] = ([good, [str(good_img), str(tmp_path / "small_m.png")]], "small_m.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cases["corrupt_image"] = ([good, [str(tmp_path / "corrupt.png"), str(good_mask)]], "corrupt.png")
    trunc = cv2.imencode(".jpg", img)[1].tobytes()
    (tmp_path / "trunc.jpg").write_bytes(trunc[: len(trunc) // 2])
    cases["truncated_image"] = ([good, [str(tmp_path / "trunc.jpg"), str(good_mask)]], "trunc.jpg")
    (tmp_path / "corrupt_m.png").write_bytes(b"not a png at all")
    cases["corrupt_mask"] = ([good, [str(good_img), str(tmp_path / "corrupt_m.png")]], "corrupt_m.png")
    grey = np.tile(np.linspace(0, 255, 30).astype(np.uint8), (20, 1))
    _write(tmp_path / "grey_m.png", grey)
    cases["non_binary_mask"] = ([good, [str(good_img), str(tmp_path / "grey_m.png")]], "grey_m.png")
    folder = tmp_path / "folder"
    _write(folder / "Tp" / "ok.png", img)
    _write(folder / "Gt" / "ok.png", mask * 255)
    _write(folder / "Tp" / "orphan.png", img)
    cases["no_mask_in_gt"] = (folder, "orphan.png")
    return cases


CASES = ["missing_mask", "missing_image", "size_mismatch", "corrupt_image", "truncated_image",
         "corrupt_mask", "non_binary_mask", "no_mask_in_gt"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_warn(tmp_path, case):
    source, name = _bad_cases(tmp_path)[case]
    with pytest.warns(UserWarning, match=name):
        ds = ForgeryDataset(source, size=8, on_error="warn")
    assert len(ds) == 1 and len(ds.skipped) == 1 and name in ds.skipped[0][0] + ds.skipped[0][1]
    assert ds[0]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize("case", CASES)
def test_bad_files_raise(tmp_path, case):
    source, name = _bad_cases(tmp_path)[case]
    with pytest.raises(ValueError, match=name):
        ForgeryDataset(source, size=8, on_error="raise")


def test_header_check_and_empty(tmp_path):
    cases = _bad_cases(tmp_path)
    with pytest.raises(ValueError, match="small_m.png"):
        ForgeryDataset(cases["size_mismatch"][0], on_error="raise", check="header")
    # Header-level checks cannot see a non-binary mask: it surfaces (and is skipped) on load.
    ds = ForgeryDataset(cases["non_binary_mask"][0], size=8, check="header")
    assert len(ds) == 2
    with pytest.warns(UserWarning, match="grey_m.png"):
        item = ds[1]
    assert item["name"] == "good.png"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable image"):
        ForgeryDataset([[str(tmp_path / "a.png"), str(tmp_path / "b.png")]])
    with pytest.raises(ValueError, match="does not exist"):
        ForgeryDataset(tmp_path / "nothing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps([["only-one"]]))
    with pytest.raises(ValueError, match="entry 0"):
        ForgeryDataset(bad_json)
    with pytest.raises(ValueError, match="mode must be"):
        ForgeryDataset(cases["missing_mask"][0], mode="crop")
    with pytest.raises(ValueError, match="on_error"):
        ForgeryDataset(cases["missing_mask"][0], on_error="ignore")


def test_image_size_from_headers(tmp_path):
    img = np.zeros((13, 29, 3), np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".tif"):
        _write(tmp_path / f"i{ext}", img)
        assert image_size(tmp_path / f"i{ext}") == (13, 29), ext


def test_unreadable_mid_epoch(json_source):
    lst, *_ = json_source
    ds = ForgeryDataset(lst, size=8)
    (lst.parent / "imgs" / "a.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="a.png"):
        item = ds[0]
    assert item["name"] == "b.png"  # the next readable item instead of a crash
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered as bad: no re-read, no second warning
        assert ds[0]["name"] == "b.png"
    os.remove(lst.parent / "imgs" / "b.png")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="none of its 2 items"):
        ds[1]


def test_dataloader_collates(json_source):
    lst, *_ = json_source
    ds = ForgeryDataset(lst, size=12, mode="pad", augment=Augment())
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 12, 12) and batch["valid"].shape == (2, 12, 12)
    assert batch["name"] == ["a.png", "b.png"] and batch["size"].tolist() == [[20, 30], [25, 15]]
    assert batch["label"].tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# Augmentations and degradations
# ---------------------------------------------------------------------------------------------
def test_augment_keeps_mask_aligned():
    img, mask = _pair(24, 40)
    geo = Augment(flip=True, rot90=True, scale=(0.5, 2.0), jpeg=None, blur=None, noise=None, color=0, p=0.7)
    shapes = set()
    for seed in range(40):
        out_img, out_mask = geo(img, mask, np.random.default_rng(seed))
        assert out_img.shape[:2] == out_mask.shape and out_img.dtype == np.uint8
        agree = ((out_img[..., 0] > 127) == (out_mask > 0)).mean()
        assert agree > 0.97, seed
        shapes.add(out_mask.shape)
        if out_mask.shape == mask.shape and not np.array_equal(out_mask, mask):
            assert not np.array_equal(out_img[..., 0] > 127, mask > 0)  # really moved
    assert len(shapes) > 3  # rotations and scales happened
    # Flip only, p = 1: exactly the mirrored arrays.
    flip = Augment(flip=True, rot90=False, scale=None, jpeg=None, blur=None, noise=None, color=0, p=1.0)
    o, m = flip(img, mask, np.random.default_rng(0))
    assert np.array_equal(m, mask[::-1, ::-1]) and np.array_equal(o, img[::-1, ::-1])


def test_augment_photometric_and_reproducible():
    img, mask = _pair(32, 32)
    aug = Augment(flip=False, rot90=False, scale=None, p=1.0)
    a = aug(img, mask, np.random.default_rng(1))
    b = aug(img, mask, np.random.default_rng(1))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], mask)
    assert not np.array_equal(a[0], img)
    with pytest.raises(ValueError, match="blur must contain an odd kernel"):
        Augment(blur=(4, 4))
    with pytest.raises(ValueError, match="jpeg must satisfy"):
        Augment(jpeg=(50, 120))
    with pytest.raises(ValueError, match="p must be a probability"):
        Augment(p=2)


@pytest.mark.parametrize("kind", list(ROBUSTNESS_PROTOCOL))
def test_degradations(kind):
    img, mask = _pair(40, 48, seed=3)
    for level in ROBUSTNESS_PROTOCOL[kind]:
        out = degrade(img, kind, level)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(out, img), (kind, level)
    # Stronger degradation -> further from the original.
    lv = sorted(ROBUSTNESS_PROTOCOL[kind], reverse=(kind in ("jpeg", "resize")))
    err = [np.abs(degrade(img, kind, l).astype(float) - img).mean() for l in (lv[0], lv[-1])]
    assert err[1] > err[0]
    # Through the callable class, the mask is untouched and noise is reproducible.
    d = Degrade(kind, ROBUSTNESS_PROTOCOL[kind][-1])
    o1, m1 = d(img, mask, np.random.default_rng(5))
    o2, _ = d(img, mask, np.random.default_rng(5))
    assert m1 is mask and np.array_equal(o1, o2)


def test_degrade_bad_levels_and_dataset(json_source):
    img, _ = _pair()
    with pytest.raises(ValueError, match="odd int kernel"):
        degrade(img, "gaussian_blur", 4)
    with pytest.raises(ValueError, match="quality in 1..100"):
        Degrade("jpeg", 101)
    with pytest.raises(ValueError, match="kind must be one of"):
        degrade(img, "rain", 1)
    lst, *_ = json_source
    clean = ForgeryDataset(lst, size=20)
    noisy = ForgeryDataset(lst, size=20, degrade=Degrade("gaussian_noise", 15))
    x, y = noisy[0], noisy[0]
    assert torch.equal(x["image"], y["image"])  # same item, same degradation (seeded by index)
    assert not torch.equal(x["image"], clean[0]["image"])
    assert torch.equal(x["mask"], clean[0]["mask"])


# ---------------------------------------------------------------------------------------------
# Balanced sampling
# ---------------------------------------------------------------------------------------------
def test_balanced_sampler():
    lengths = [5, 100, 20]
    s = BalancedSampler(lengths, num_samples=300, seed=1)
    idx = list(s)
    assert len(idx) == len(s) == 300
    offsets = np.cumsum([0] + lengths)
    which = Counter(int(np.searchsorted(offsets, i, side="right") - 1) for i in idx)
    assert which == {0: 100, 1: 100, 2: 100}
    small = Counter(i for i in idx if i < 5)
    assert set(small.values()) == {20}  # the small data set is cycled evenly
    assert len(set(i for i in idx if 5 <= i < 105)) == 100  # the big one without repeats
    assert list(BalancedSampler(lengths, num_samples=300, seed=1)) == idx  # seeded
    s.set_epoch(1)
    assert list(s) != idx and sorted(Counter(list(s)).values()) == sorted(Counter(idx).values())
    # Remainders spread over data sets, and a ConcatDataset works as input.
    cat = ConcatDataset([torch.arange(3), torch.arange(7)])
    s2 = BalancedSampler(cat, num_samples=9, seed=0)
    assert len(list(s2)) == 9 and all(0 <= i < 10 for i in s2)
    # DDP: ranks get disjoint slices of the same epoch, padded to equal length.
    r0 = list(BalancedSampler(lengths, 301, seed=2, num_replicas=2, rank=0))
    r1 = list(BalancedSampler(lengths, 301, seed=2, num_replicas=2, rank=1))
    full = list(BalancedSampler(lengths, 301, seed=2))
    assert len(r0) == len(r1) == 151
    assert sorted(r0 + r1[:-1]) == sorted(full)
    with pytest.raises(ValueError, match="non-empty"):
        BalancedSampler([3, 0])
    with pytest.raises(ValueError, match="rank"):
        BalancedSampler([3], num_replicas=2, rank=2)
