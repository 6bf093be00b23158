"""The camera-trace stage: source mosaics, their labels, the weights file and train.init."""
import json

import cv2
import numpy as np
import pytest
import torch

from fastiml.data.trace import PROCESSINGS, TraceMosaics, labels_at_stride
from fastiml.engine.pretrain import SHIPPED_INIT, load_init, pretrain_trace
from fastiml.models import NCLNet

GREYS = (20, 110, 200)  # one flat grey per photograph: a pixel's grey tells its photograph
TINY = dict(encoder="resnet18", base_width=8, decoder_channels=16, proj_dim=8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for k, g in enumerate(GREYS):
        cv2.imwrite(str(root / f"p{k}.png"), np.full((96, 120, 3), g, np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def test_labels_name_the_photograph_each_pixel_came_from(photos):
    data = TraceMosaics(photos, size=64, batch_size=4, pool=3, seed=3)
    assert data.num_labels == len(GREYS) * len(PROCESSINGS)
    for i in range(12):
        item = data[i]
        grey = item["image"][0].numpy() * 255
        photo = item["labels"].numpy() // len(PROCESSINGS)
        # processing moves a flat grey by a few levels at most (noise: sigma 3)
        assert np.abs(grey - np.take(GREYS, photo)).max() < 16
        assert len(np.unique(item["labels"])) >= 2  # at least one region pasted in


def test_items_are_reproducible_and_seeded(photos):
    a, b = TraceMosaics(photos, size=32, seed=1), TraceMosaics(photos, size=32, seed=1)
    assert torch.equal(a[5]["image"], b[5]["image"]) and torch.equal(a[5]["labels"], b[5]["labels"])
    c = TraceMosaics(photos, size=32, seed=2)
    assert any(not torch.equal(a[i]["labels"], c[i]["labels"]) for i in range(4))


def test_a_batch_draws_from_one_pool_of_sources(photos):
    data = TraceMosaics(photos, size=32, batch_size=4, pool=2, seed=0)
    for batch in range(3):
        labels = set()
        for i in range(4 * batch, 4 * batch + 4):
            labels |= set(data[i]["labels"].unique().tolist())
        assert len(labels) <= 2


def test_bad_arguments_name_themselves(photos, tmp_path):
    with pytest.raises(ValueError, match="size"):
        TraceMosaics(photos, size=8)
    with pytest.raises(ValueError, match="smaller than size=128"):
        TraceMosaics(photos, size=128)
    with pytest.raises(ValueError, match="not a folder"):
        TraceMosaics(tmp_path / "missing")
    with pytest.raises(ValueError, match="at least 2 photographs"):
        TraceMosaics(tmp_path)


def test_labels_at_stride_ignores_cells_that_straddle_two_sources():
    labels = torch.tensor([[[3, 3, 5, 5], [3, 3, 5, 3], [7, 7, 7, 7], [7, 7, 7, 7]]])
    assert labels_at_stride(labels, 2).tolist() == [[[3, -1], [7, 7]]]
    assert labels_at_stride(labels, 1) is labels


@pytest.fixture(scope="module")
def weights(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "trace.pt"
    prov = pretrain_trace([photos], str(out), minutes=0.02, model=TINY, size=32, batch_size=4,
                          threads=1, command="test", log=lambda s: None)
    return out, prov


def test_weights_file_records_its_provenance(weights):
    out, prov = weights
    saved = torch.load(out, weights_only=True)
    assert saved["model"] == TINY and saved["input_filter"] == "highpass"
    assert prov["photos"] == ["p0.png", "p1.png", "p2.png"] and prov["steps"] >= 1
    assert saved["provenance"]["command"] == "test"


def test_init_loads_all_but_the_segmentation_heads(weights):
    out, _ = weights
    torch.manual_seed(0)
    model = NCLNet(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_init(model, str(out), TINY, "highpass")
    saved = torch.load(out, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        if ".seg." in k:
            assert torch.equal(v, before[k]), k
        elif v.is_floating_point():
            assert torch.equal(v, saved[k].float()), k


def test_init_gives_mpc_the_encoder(weights):
    from fastiml.models import MPCNet

    out, _ = weights
    options = dict(encoder="resnet18", base_width=8, embed_dim=8, head_channels=8, fpn_channels=8)
    model = MPCNet(**options)
    summary = load_init(model, str(out), options, "highpass")
    saved = torch.load(out, weights_only=True)["state_dict"]
    trunk = {k[len("backbone.trunk."):]: v for k, v in saved.items() if k.startswith("backbone.trunk.")}
    own = model.state_dict()
    assert trunk and all(torch.equal(own["backbone." + k], v.to(own["backbone." + k].dtype))
                         for k, v in trunk.items())
    assert f"{len(trunk)} of {len(own)} tensors" in summary


def test_init_refuses_weights_of_another_network_or_input(weights, tmp_path):
    out, _ = weights
    model = NCLNet(**TINY)
    with pytest.raises(ValueError, match="method.model.base_width"):
        load_init(model, str(out), dict(TINY, base_width=16), "highpass")
    with pytest.raises(ValueError, match="input_filter"):
        load_init(model, str(out), TINY, "none")
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a fastiml weights file"):
        load_init(model, str(bad), TINY, "highpass")
    with pytest.raises(ValueError, match="camera-trace"):
        load_init(model, str(tmp_path / "none.pt"), TINY, "highpass")


def test_train_init_is_checked_before_training(tmp_path):
    from fastiml.data import synthesize
    from fastiml.engine import ConfigError, load_config, train

    r = synthesize(tmp_path / "d", 8, size=32, seed=0)
    cfg = load_config(None, [f"data.train={r['json']}", "data.size=32", f"output.dir={tmp_path}",
                             "train.init=" + str(tmp_path / "missing.pt"), "train.steps=1",
                             "train.progress=false"])
    with pytest.raises(ConfigError, match="train.init"):
        train(cfg)


def test_shipped_weights_fit_the_demo_network():
    from fastiml.cli import _demo_config_path
    from fastiml.engine import load_config

    path = SHIPPED_INIT["camera-trace"]
    if not path.is_file():
        pytest.skip("no shipped camera-trace weights in this checkout")
    assert path.stat().st_size <= 10 * 2**20
    cfg = load_config(_demo_config_path("ncl"))
    model = NCLNet(**cfg["method"]["model"])
    summary = load_init(model, "camera-trace", cfg["method"]["model"], cfg["data"]["input_filter"])
    assert "camera-trace steps" in summary
    prov = torch.load(path, weights_only=True)["provenance"]
    assert json.dumps(prov) and "fastiml pretrain-trace --photos" in prov["command"]
