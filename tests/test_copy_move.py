"""fastiml.copy_move: duplicated regions found by matching an image with itself, and their fusion
into a network's map (ForgeryDataset(copy_move=...), evaluate, predict_image)."""
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from fastiml.copy_move import COPY_MOVE_SCORE, copy_move_regions
from fastiml.data import ForgeryDataset
from fastiml.engine.evaluate import copy_move_from_config, evaluate, fuse_copy_move, predict_image
from fastiml.metrics import IMLMetrics

SIDE = 256


def texture(seed: int, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """uint8 [h, w, 3]: noise blurred at several scales, a photograph-like texture that never
    repeats (so an untouched one holds no copy)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w), np.float32)
    for sigma, weight in ((8.0, 60.0), (3.0, 30.0), (1.0, 20.0)):
        out += weight * cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    grey = np.clip(128 + 1.5 * out, 0, 255).astype(np.uint8)
    return np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey], axis=2)


def disc(cx: int, cy: int, r: int, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (cx, cy), r, 1, -1)
    return m


def shifted_copy(img, src_c, dst_c, r):
    """img with a disc of radius r around src_c copied to dst_c; (image, source, destination)."""
    h, w = img.shape[:2]
    dst = disc(*dst_c, r, h, w)
    moved = np.roll(img, (dst_c[1] - src_c[1], dst_c[0] - src_c[0]), axis=(0, 1))
    return np.where(dst[..., None] > 0, moved, img), disc(*src_c, r, h, w), dst


def rotated_copy(img, src_c, dst_c, r, angle_deg, scale):
    """The disc around dst_c shows the source rotated and scaled (cv2.warpAffine, bilinear)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) / scale
    t = np.array(src_c, float) - rot @ np.array(dst_c, float)  # dst p shows img(rot p + t)
    m = np.hstack([rot, t[:, None]])
    warped = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    dst = disc(*dst_c, r)
    return np.where(dst[..., None] > 0, warped, img), disc(*src_c, round(r / scale)), dst


def coverage(found: np.ndarray, region: np.ndarray) -> float:
    return float((found.astype(bool) & region.astype(bool)).sum() / region.sum())


def test_a_shifted_copy_is_found_on_both_sides_and_nothing_else():
    img, src, dst = shifted_copy(texture(0), (70, 70), (180, 170), 28)
    found = copy_move_regions(img)
    assert found.shape == (SIDE, SIDE) and found.dtype == np.uint8 and set(np.unique(found)) <= {0, 1}
    assert coverage(found, src) > 0.8 and coverage(found, dst) > 0.8  # both copies, filled
    outside = ~(cv2.dilate(src | dst, np.ones((7, 7), np.uint8)).astype(bool))
    assert found[outside].mean() < 0.01


@pytest.mark.parametrize("angle, scale", [(20.0, 1.0), (-15.0, 1.2), (10.0, 0.85)])
def test_a_rotated_and_scaled_copy_is_found(angle, scale):
    img, src, dst = rotated_copy(texture(1), (75, 80), (175, 170), 30, angle, scale)
    found = copy_move_regions(img)
    assert coverage(found, dst) > 0.6 and coverage(found, src) > 0.6
    outside = ~(cv2.dilate(src | dst, np.ones((9, 9), np.uint8)).astype(bool))
    assert found[outside].mean() < 0.02


def test_the_flat_inside_of_a_copy_is_filled():
    """A flat patch inside a copy cannot be verified (no texture to correlate) but lies in it."""
    img = texture(7)
    flat = disc(70, 70, 9).astype(bool)
    img[flat] = 128
    img, src, dst = shifted_copy(img, (70, 70), (180, 170), 30)
    found = copy_move_regions(img)
    assert found[disc(180, 170, 9) > 0].all() and found[flat].all()


def test_an_untouched_image_has_no_copy():
    for seed in range(3):
        assert copy_move_regions(texture(10 + seed)).sum() == 0


def test_a_large_image_is_matched_at_max_side_and_answered_at_its_own_size():
    img, src, dst = shifted_copy(texture(2, 300, 420), (90, 90), (300, 200), 40)
    found = copy_move_regions(img, max_side=200)
    assert found.shape == (300, 420)
    assert coverage(found, src) > 0.7 and coverage(found, dst) > 0.7


def test_grey_flat_and_tiny_images():
    img, src, dst = shifted_copy(texture(3), (70, 70), (180, 170), 28)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    assert coverage(copy_move_regions(grey), dst) > 0.8  # [H, W] input works as well
    assert copy_move_regions(np.full((64, 80, 3), 128, np.uint8)).sum() == 0  # nothing to match
    assert copy_move_regions(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1)
    assert copy_move_regions(np.zeros((15, 300, 3), np.uint8)).shape == (15, 300)


@pytest.mark.parametrize("bad, match", [
    (dict(image=np.zeros((32, 32, 3), np.float32)), r"image must be uint8 \[H, W, 3\]"),
    (dict(image=np.zeros((32, 32, 4), np.uint8)), r"image must be uint8 \[H, W, 3\]"),
    (dict(image=np.zeros((0, 32, 3), np.uint8)), "image must have at least one pixel"),
    (dict(ratio=1.0), r"ratio must be in \(0, 1\)"),
    (dict(min_ncc=0.0), r"min_ncc must be in \(0, 1\)"),
    (dict(min_matches=2), "min_matches must be an int >= 3"),
    (dict(min_matches=4.0), "min_matches must be an int >= 3"),
    (dict(max_side=32), "max_side must be an int >= 64"),
])
def test_bad_arguments_are_named(bad, match):
    kw = dict(image=np.zeros((32, 32, 3), np.uint8))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        copy_move_regions(kw.pop("image"), **kw)
    with pytest.raises(TypeError, match="image must be a numpy array"):
        copy_move_regions(torch.zeros(32, 32, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------ fusion
def _write_set(root):
    """One copy-move and one untouched image with their masks (destination only, as data sets
    label a copy-move)."""
    (root / "Tp").mkdir(parents=True)
    (root / "Gt").mkdir()
    (root / "Au").mkdir()
    img, src, dst = shifted_copy(texture(4), (70, 70), (180, 170), 28)
    cv2.imwrite(str(root / "Tp" / "cm.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "Gt" / "cm.png"), dst * 255)
    cv2.imwrite(str(root / "Au" / "au.png"), cv2.cvtColor(texture(5), cv2.COLOR_RGB2BGR))
    return img, src, dst


class _Flat(nn.Module):
    """A network whose map is 0.1 everywhere (below any threshold): what is scored is the fusion."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))


class _FlatMethod:
    @staticmethod
    def predict(net, x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), 0.1) + 0 * net.p


def test_dataset_items_carry_the_copies_resized_as_the_mask(tmp_path):
    img, src, dst = _write_set(tmp_path)
    plain = ForgeryDataset(str(tmp_path), size=128, mode="resize")
    fused = ForgeryDataset(str(tmp_path), size=128, mode="resize", copy_move="keypoints")
    for i in range(len(plain)):
        a, b = plain.read_item(i), fused.read_item(i)
        assert "copy_move" not in a
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["image"], b["image"])
    cm = next(fused.read_item(i) for i in range(len(fused)) if fused.samples[i][1] is not None)
    want = cv2.resize(copy_move_regions(img), (128, 128), interpolation=cv2.INTER_NEAREST_EXACT)
    assert cm["copy_move"].dtype == torch.float32 and cm["copy_move"].sum() > 0
    assert torch.equal(cm["copy_move"], torch.from_numpy(want.astype(np.float32)))
    with pytest.raises(ValueError, match="copy_move must be one of keypoints, off"):
        ForgeryDataset(str(tmp_path), size=128, copy_move="sift")


def test_evaluate_scores_the_fused_map(tmp_path):
    _write_set(tmp_path)
    ds = ForgeryDataset(str(tmp_path), size=128, mode="resize", copy_move="keypoints")
    got = evaluate(_Flat(), _FlatMethod(), ds, batch_size=2)
    ref = IMLMetrics(threshold=0.5)
    for i in range(len(ds)):
        it = ds.read_item(i)
        prob = torch.maximum(torch.full_like(it["mask"], 0.1), COPY_MOVE_SCORE * it["copy_move"])
        ref.update(prob[None, None], it["mask"][None], it["valid"][None])
    want = ref.compute()
    assert got["pixel_f1"] == pytest.approx(want["pixel_f1"], abs=1e-6)
    # both copies are marked, only the destination is labelled: F1 about 2/3
    assert 0.55 < got["pixel_f1"] < 0.75 and got["image_auc"] == 1.0
    off = evaluate(_Flat(), _FlatMethod(), ForgeryDataset(str(tmp_path), size=128), batch_size=2)
    assert off["pixel_f1"] == 0.0


def test_predict_image_fuses_at_the_image_resolution():
    img, src, dst = shifted_copy(texture(6), (70, 70), (180, 170), 28)
    kw = dict(size=64, mode="resize")
    alone = predict_image(_Flat(), _FlatMethod(), img, **kw)
    fused = predict_image(_Flat(), _FlatMethod(), img, copy_move="keypoints", **kw)
    np.testing.assert_allclose(alone, 0.1, atol=1e-6)
    np.testing.assert_array_equal(fused, fuse_copy_move(alone, copy_move_regions(img)))
    assert (fused[dst > 0] == np.float32(COPY_MOVE_SCORE)).mean() > 0.8
    with pytest.raises(ValueError, match="copy_move must be one of"):
        predict_image(_Flat(), _FlatMethod(), img, copy_move="yes", **kw)


def test_config_key():
    assert copy_move_from_config({}) == "keypoints"  # old checkpoints: the default
    assert copy_move_from_config({"copy_move": "off"}) == "off"
    with pytest.raises(ValueError, match="eval.copy_move must be one of keypoints, off"):
        copy_move_from_config({"copy_move": True})


def test_training_scores_test_with_the_matching_and_val_without(tmp_path):
    """train's final test score is `fastiml eval`'s (eval.copy_move); its val score, taken every
    train.eval_every steps, watches the network alone (the matching does not change as it trains)."""
    from fastiml.data import synthesize
    from fastiml.engine import load_config, model_from_checkpoint, train
    _write_set(tmp_path / "cm")
    synthesize(tmp_path / "train", 4, size=32, seed=3, authentic_fraction=0.25)
    cm = str(tmp_path / "cm")
    cfg = load_config(None, [f"data.train={tmp_path / 'train' / 'list.json'}", f"data.val={cm}",
                             f"data.test={cm}", "data.size=32", "data.augment=false",
                             "data.num_workers=0", "train.method=bce", "train.steps=1",
                             "train.batch_size=4", "train.threads=1", "train.progress=false",
                             f"output.dir={tmp_path / 'run'}"])
    cfg["method"] = {"model": {"encoder": "resnet18", "base_width": 8, "decoder_channels": 16}}
    got = train(cfg)["metrics"]
    model, method, _ = model_from_checkpoint(tmp_path / "run" / "model.pt")
    want = {mode: evaluate(model, method, ForgeryDataset(cm, size=32, copy_move=mode))
            for mode in ("keypoints", "off")}
    assert want["keypoints"]["pixel_auc"] != pytest.approx(want["off"]["pixel_auc"], abs=1e-3)
    for key in ("pixel_auc", "pixel_f1", "image_auc"):
        assert got["test"][key] == pytest.approx(want["keypoints"][key], abs=1e-6)
        assert got["val"][key] == pytest.approx(want["off"][key], abs=1e-6)
