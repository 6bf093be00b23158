"""Inference at the image's own resolution (fastiml.engine.inference): tile layout, blending
weights, tiled against untiled predictions, native-resolution evaluation with per-image rows."""
import json
import os
import re

import numpy as np
import pytest
import torch

from fastiml.data import ForgeryDataset, synthesize
from fastiml.engine import evaluate, predict_image
from fastiml.engine.inference import (Tiling, blend_window, predict_tiled, tile_starts,
                                      tiling_from_config)
from fastiml.methods import build
from fastiml.metrics import per_image_metrics

TINY_NCL = {"encoder": "resnet18", "base_width": 8, "decoder_channels": 16, "proj_dim": 16}


@pytest.mark.parametrize("length,tile,overlap", [(10, 16, 4), (16, 16, 4), (17, 16, 4),
                                                 (100, 32, 8), (101, 32, 0), (45, 20, 19)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + tile, length) == length  # the last tile reaches the end
    covered = np.zeros(length, int)
    for s in starts:
        covered[s:s + tile] += 1
    assert covered.min() >= 1
    for a, b in zip(starts, starts[1:]):  # neighbours share at least `overlap` pixels
        assert a + tile - b >= overlap


def test_blend_window_ramps_sum_to_one():
    t, ov = 20, 6
    w = blend_window(t, t, ov)
    assert w.shape == (t, t) and float(w.min()) > 0 and float(w.max()) == 1.0
    # Two tiles one step (t - ov) apart: in their overlap the falling and rising ramps add to 1.
    row = blend_window(1, t, ov, top=False, bottom=False)[0]
    torch.testing.assert_close(row[t - ov:] + row[:ov], torch.ones(ov))
    assert torch.all(row[ov:t - ov] == 1)
    # Edges on the image border are not ramped.
    edge = blend_window(t, t, ov, top=False, left=False)
    assert torch.all(edge[0, : t - ov] == 1) and torch.all(edge[: t - ov, 0] == 1)
    assert float(edge[-1, -1]) < 1


def _pointwise(t):
    """A 'network' whose output at a pixel depends on that pixel only."""
    return torch.sigmoid(4 * t.mean(1, keepdim=True) - 2)


@pytest.mark.parametrize("h,w", [(45, 70), (37, 53), (64, 64)])
def test_tiled_equals_untiled_for_a_pointwise_predictor(h, w):
    # Blending is a weighted mean of identical values there: any tiling must give them back.
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
    whole = _pointwise(x)
    for tiling in (Tiling(max_pixels=100, tile=16, overlap=5), Tiling(max_pixels=1, tile=24, overlap=0),
                   Tiling(max_pixels=1, tile=33, overlap=32)):
        torch.testing.assert_close(predict_tiled(_pointwise, x, tiling), whole)


def test_tiles_are_blended_not_overwritten():
    # A predictor that returns 1 on tiles starting at column 0 and 0 elsewhere: in the overlap
    # the blend lies strictly between, rising smoothly with the ramp.
    def left_tile_is_one(t):
        return torch.full((t.shape[0], 1, *t.shape[-2:]), float(t[0, 0, 0, 0] == 0))

    x = torch.ones(1, 3, 8, 40)
    x[..., 0] = 0  # column 0 marks the first tile
    p = predict_tiled(left_tile_is_one, x, Tiling(max_pixels=1, tile=24, overlap=8))[0, 0, 0]
    assert torch.all(p[:16] == 1) and torch.all(p[24:] == 0)
    mid = p[16:24]
    assert torch.all((mid > 0) & (mid < 1)) and torch.all(mid[1:] < mid[:-1])


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    method = build("ncl", model=TINY_NCL)
    model = method.build_model().eval()
    return model, method


def test_network_tiled_equals_untiled_when_the_tile_covers_the_image(net):
    model, method = net
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))  # not a multiple of 16
    with torch.no_grad():
        whole = method.predict(model, x).float()
    assert whole.shape == (1, 1, 37, 53)
    # Above the pixel budget, but one tile covers the image: the same single pass.
    tiled = predict_tiled(lambda t: method.predict(model, t), x,
                          Tiling(max_pixels=100, tile=64, overlap=16))
    torch.testing.assert_close(tiled, whole)
    # Real tiles of a real network: right shape, probabilities.
    tiled = predict_tiled(lambda t: method.predict(model, t), x,
                          Tiling(max_pixels=100, tile=32, overlap=8))
    assert tiled.shape == (1, 1, 37, 53) and 0 <= float(tiled.min()) <= float(tiled.max()) <= 1


def test_predict_image_native_keeps_the_pixels(net):
    model, method = net
    img = (np.random.default_rng(0).random((45, 71, 3)) * 255).astype(np.uint8)
    native = predict_image(model, method, img, size=32, mode="resize", tiling=Tiling())
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        direct = method.predict(model, x)[0, 0].numpy()
    np.testing.assert_allclose(native, np.clip(direct, 0, 1), atol=1e-6)
    resized = predict_image(model, method, img, size=32, mode="resize")
    assert resized.shape == native.shape == (45, 71)
    assert not np.allclose(resized, native, atol=1e-3)  # the two modes really differ


def test_evaluate_native_on_images_of_several_sizes(net, tmp_path):
    model, method = net
    for k, size in enumerate((24, 40)):
        synthesize(tmp_path / f"s{size}", 3, size=size, seed=k, authentic_fraction=0.34)
    sources = [str(tmp_path / "s24" / "list.json"), str(tmp_path / "s40" / "list.json")]
    ds = ForgeryDataset(sources, size=32, mode="native")
    rows = []
    tiling = Tiling(max_pixels=30 * 30, tile=32, overlap=8)  # the 40 px images are tiled
    m = evaluate(model, method, ds, batch_size=1, tiling=tiling,
                 on_batch=lambda b, p: rows.append(per_image_metrics(p[0, 0], b["mask"][0])))
    assert m["n_images"] == 6 and len(rows) == 6
    # The same numbers, image by image, through predict_image at native resolution.
    for (img_path, mask_path), r in zip(ds.samples, rows):
        item = ds[ds.samples.index((img_path, mask_path))]
        img = (item["image"].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        prob = predict_image(model, method, img, size=32, mode="resize", tiling=tiling)
        assert prob.shape == tuple(item["size"].tolist())
        assert r["score"] == pytest.approx(float(prob.max()), abs=1e-5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluate_names_an_item_that_breaks_after_listing(net, tmp_path, num_workers):
    """Evaluation never scores one file in another's place: a ValueError naming the file, with
    its text intact through the loader's worker processes; the data set's training behaviour
    (the next readable item instead) is unchanged."""
    model, method = net
    synthesize(tmp_path, 5, size=24, seed=3, authentic_fraction=0.4)
    ds = ForgeryDataset(str(tmp_path / "list.json"), size=32, mode="resize")
    assert evaluate(model, method, ds, batch_size=2, num_workers=num_workers)["n_images"] == 5
    victim = ds.samples[3][0]
    with open(victim, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match=re.escape(victim)) as e:
        evaluate(model, method, ds, batch_size=2, num_workers=num_workers)
    assert str(e.value).startswith("item 3 ") and "could not be decoded" in str(e.value)
    with pytest.warns(UserWarning, match="returning the next readable item"):
        assert ds[3]["name"] == os.path.basename(ds.samples[4][0])


def test_tiling_from_config_and_bad_values():
    assert tiling_from_config({"resolution": "train"}) is None
    assert tiling_from_config({}) == Tiling()  # old checkpoints: native, default tiles
    t = tiling_from_config({"resolution": "train", "tile": 64, "overlap": 8}, "native")
    assert t == Tiling(max_pixels=Tiling().max_pixels, tile=64, overlap=8)
    with pytest.raises(ValueError, match="resolution"):
        tiling_from_config({}, "full")
    with pytest.raises(ValueError, match="overlap"):
        Tiling(tile=16, overlap=16)
    with pytest.raises(ValueError, match="tile"):
        Tiling(tile=0)


def test_synth_writes_the_kinds(tmp_path):
    r = synthesize(tmp_path, 5, size=24, seed=3, authentic_fraction=0.2)
    meta = json.loads((tmp_path / "meta.json").read_text())
    pairs = json.loads((tmp_path / "list.json").read_text())
    assert [m["image"] for m in meta] == [p[0] for p in pairs]
    kinds = [m["kind"] for m in meta]
    assert kinds.count("authentic") == 1 and sum(r["counts"].values()) == 5


def test_self_correlation_finds_a_copied_patch():
    from fastiml.models.layers import SelfCorrelation
    torch.manual_seed(0)
    f = torch.randn(1, 8, 6, 7)
    f[..., 4, 5] = f[..., 1, 1]  # a "copied" feature: its best match elsewhere is exact
    block = SelfCorrelation(out_ch=4, k=3, exclude=1)
    v = torch.nn.functional.normalize(f.flatten(2), dim=1)[0]
    sim = v.T @ v
    # the block's first sorted channel, before its 1x1 conv, is each position's best far match
    captured = {}
    block.proj.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    block.eval()(f)
    top1 = captured["x"][0, 0]
    assert float(top1[4, 5]) == pytest.approx(1.0, abs=1e-5) and float(top1[1, 1]) == pytest.approx(1.0, abs=1e-5)
    i = 2 * 7 + 3  # position (2, 3): its 3x3 neighbourhood is excluded
    far = [j for j in range(42) if abs(j // 7 - 2) > 1 or abs(j % 7 - 3) > 1]
    assert float(top1[2, 3]) == pytest.approx(float(sim[i, far].max()), abs=1e-5)


def test_nclnet_with_self_correlation(net):
    torch.manual_seed(0)
    method = build("ncl", model=dict(TINY_NCL, self_correlation=8))
    model = method.build_model().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 37, 53))
    assert out["pred_mask"].shape == (2, 1, 37, 53)
    with pytest.raises(ValueError, match="self_correlation"):
        build("ncl", model=dict(TINY_NCL, self_correlation=-1)).build_model()
