"""The training / evaluation engine on tiny CPU runs: config, schedule, training lowers the loss
(ncl, bce, both mpc stages), checkpoints and resume, evaluation, prediction at the original size,
time budgets."""
import importlib
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from fastiml.data import synthesize
from fastiml.engine import (REQUIRED_KEYS, CheckpointError, ConfigError, WarmupCosine,
                            build_dataset, config_to_toml, evaluate, load_checkpoint, load_config,
                            model_from_checkpoint, predict_image, save_checkpoint, train)
from fastiml.engine.report import loss_curve, panel, read_log

TINY_NCL = {"encoder": "resnet18", "base_width": 8, "decoder_channels": 16, "proj_dim": 16}
TINY_MPC = {"encoder": "resnet18", "base_width": 8, "embed_dim": 16, "head_channels": 16,
            "fpn_channels": 16, "drop_path": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_data")
    synthesize(root / "train", 4, size=32, seed=11, authentic_fraction=0.25)
    synthesize(root / "test", 4, size=32, seed=12, authentic_fraction=0.25)
    return root


def tiny_cfg(data, out, method="bce", steps=6, **train):
    overrides = [f"data.train={data / 'train' / 'list.json'}", "data.size=32", "data.augment=false",
                 "data.preload=true", "data.num_workers=0", f"train.method={method}",
                 f"train.steps={steps}", "train.batch_size=4", "train.lr=5e-3",
                 "train.warmup_steps=0", "train.log_every=1", "train.threads=2",
                 "train.progress=false", f"output.dir={out}"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config(None, overrides)
    cfg["method"] = {"model": dict(TINY_MPC if method == "mpc" else TINY_NCL)}
    if method == "ncl":
        cfg["method"]["loss"] = {"patch": 2}
    return cfg


def losses(out, stage=None):
    return [r["loss"] for r in read_log(os.path.join(out, "train_log.jsonl"))
            if stage is None or r["stage_index"] == stage]


# ------------------------------------------------------------------------------------- config
def test_config_overrides_are_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 1e-3\nmethod = "bce"\n[method]\nmodel = { base_width = 8 }\n')
    cfg = load_config(path, ["train.lr=3e-4", "train.batch_size=2", "data.augment=false",
                             "train.amp=bf16", "method.model.base_width=16", "method.loss.tau=0.2",
                             'data.train=["a.json", "b"]', "data.val=some/folder",
                             "train.time_budget_s=5"])
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["batch_size"] == 2 and cfg["data"]["augment"] is False
    assert cfg["train"]["amp"] == "bf16" and cfg["train"]["method"] == "bce"
    assert cfg["method"] == {"model": {"base_width": 16}, "loss": {"tau": 0.2}}
    assert cfg["data"]["train"] == ["a.json", "b"] and cfg["data"]["val"] == "some/folder"
    assert cfg["train"]["time_budget_s"] == 5.0
    # The resolved config written to config.toml reads back to the same dict.
    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("text, overrides, needle", [
    ("[train]\nlrr = 1\n", [], "train.lrr"),
    ("[trian]\nlr = 1\n", [], "[trian]"),
    ("", ["train.nope=1"], "train.nope"),
    ("", ["bogus.key=1"], "[bogus]"),
    ("", ["train.lr=fast"], "train.lr"),
    ("", ["train.batch_size=1.5"], "train.batch_size"),
    ("", ["data.augment=maybe"], "data.augment"),
    ("", ["train.amp=fp8"], "train.amp"),
    ("", ["data.mode=crop"], "data.mode"),
    ("", ["train.batch_size=0"], "train.batch_size"),
    ("", ["noequals"], "section.key=value"),
    ("[train]\nlr = \"high\"\n", [], "train.lr"),
    ("[train\n", [], "not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_unknown_method_and_bad_method_option(data, tmp_path):
    cfg = tiny_cfg(data, tmp_path / "a")
    cfg["train"]["method"] = "nope"
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        train(cfg)
    cfg = tiny_cfg(data, tmp_path / "b")
    cfg["method"]["model"]["no_such_option"] = 1
    with pytest.raises(ConfigError, match="no_such_option"):
        train(cfg)


@pytest.mark.parametrize("name", ["demo.toml", "demo_bce.toml", "demo_mpc.toml"])
def test_packaged_demo_configs_build(name):
    # The demo's configs ship with the package: each validates, names its own method and builds
    # a network that maps a 128x128 residual image to a one-channel map of the same size.
    from fastiml import methods
    from fastiml.engine.config import DEFAULTS
    path = os.path.join(os.path.dirname(importlib.import_module("fastiml").__file__),
                        "configs", name)
    cfg = load_config(path)
    assert set(cfg["demo"]) <= {"n_train", "n_test", "synth", "photos"}
    assert cfg["train"]["init"] == "camera-trace" and cfg["demo"]["photos"] is False
    assert cfg["data"]["input_filter"] == "highpass"
    method = methods.build(cfg["train"]["method"], **cfg["method"])
    expected = name[len("demo_"):-len(".toml")] if "_" in name else "ncl"
    assert method.name == expected and set(cfg) == set(DEFAULTS)
    model = method.build_model().eval()
    with torch.no_grad():
        prob = method.predict(model, torch.rand(1, 3, 128, 128))
    assert prob.shape[-2:] == (128, 128)


# ----------------------------------------------------------------------------------- schedule
def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = WarmupCosine(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    s.set_total(40)  # re-fitting stretches the cosine at once
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 16 / 36)))
    state = s.state_dict()
    s2 = WarmupCosine(torch.optim.AdamW([p], lr=1.0), total_steps=5)
    s2.load_state_dict(state)
    assert s2.total_steps == 40 and s2.last_epoch == 20


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["ncl", "bce"])
def test_training_lowers_the_loss(data, tmp_path, method):
    out = tmp_path / method
    result = train(tiny_cfg(data, out, method, steps=10))
    ls = losses(out)
    assert len(ls) == 10 and all(math.isfinite(x) for x in ls)
    assert np.mean(ls[-3:]) < ls[0], ls
    assert result["steps"] == 10 and os.path.isfile(result["checkpoint"])
    assert 0.0 <= result["data_wait_fraction"] < 1.0
    rec = read_log(os.path.join(out, "train_log.jsonl"))[-1]
    for key in ("step", "stage", "loss", "parts", "lr", "imgs_per_s", "data_wait_fraction"):
        assert key in rec
    assert rec["lr"] < 5e-3  # the cosine has come down


def test_mpc_two_stages(data, tmp_path):
    out = tmp_path / "mpc"
    train(tiny_cfg(data, out, "mpc", steps=12))
    recs = read_log(os.path.join(out, "train_log.jsonl"))
    assert [r["stage"] for r in recs] == ["contrast"] * 6 + ["localize"] * 6
    for stage in (0, 1):
        ls = losses(out, stage)
        assert np.mean(ls[-2:]) < ls[0], (stage, ls)
    # Stage 2 trains the head only: the backbone (weights and BN statistics) is untouched.
    mid = load_checkpoint(out / "checkpoints" / "step_0000006.pt")
    end = load_checkpoint(out / "model.pt")
    assert mid["progress"]["stage"] == 0 and end["progress"]["stage"] == 1
    frozen = [k for k in end["model"] if not k.startswith("head.")]
    assert any(k.startswith("backbone.") for k in frozen)
    for k in frozen:
        assert torch.equal(mid["model"][k], end["model"][k]), k
    assert any(not torch.equal(mid["model"][k], end["model"][k])
               for k in end["model"] if k.startswith("head.") and end["model"][k].is_floating_point())


# 2 batches per epoch: steps 1 and 3 are inside an epoch; mpc's step 1 is in its first stage,
# whose drop_path draws at random
@pytest.mark.parametrize("method, at", [("bce", 3), ("mpc", 1)])
def test_checkpoint_resume_continues_at_the_right_step(data, tmp_path, method, at):
    kw = dict(ckpt_every=at, batch_size=2)
    full = tmp_path / "full"
    train(tiny_cfg(data, full, method, steps=5, **kw))
    ckpt = full / "checkpoints" / f"step_{at:07d}.pt"
    state = load_checkpoint(ckpt)
    assert state["progress"]["step"] == at and state["method"]["name"] == method
    assert state["progress"]["batch_in_epoch"] == 1 and state["optimizer"] is not None

    part = tmp_path / "resumed"
    result = train(tiny_cfg(data, part, method, steps=5, **kw), resume=str(ckpt))
    assert result["steps"] == 5
    assert [r["step"] for r in read_log(os.path.join(part, "train_log.jsonl"))] == list(
        range(at + 1, 6))
    # Same data order, random draws, optimizer and schedule: bit-equal to the full run.
    a = load_checkpoint(full / "model.pt")["model"]
    b = load_checkpoint(part / "model.pt")["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_with_other_method_is_refused(data, tmp_path):
    train(tiny_cfg(data, tmp_path / "a", "bce", steps=1))
    with pytest.raises(ConfigError, match="omit --config"):
        train(tiny_cfg(data, tmp_path / "b", "ncl", steps=2), resume=str(tmp_path / "a" / "model.pt"))


def test_time_budget_fits_the_schedule(data, tmp_path, monkeypatch):
    # A fake clock that advances 0.2 s per reading: deterministic on a busy machine.
    engine_train = importlib.import_module("fastiml.engine.train")  # (the package exports train())
    now = [0.0]

    def clock():
        now[0] += 0.2
        return now[0]

    monkeypatch.setattr(engine_train, "_clock", clock)
    out = tmp_path / "budget"
    cfg = tiny_cfg(data, out, "bce", steps=0, epochs=0, time_budget_s=4.0, log_every=100)
    result = train(cfg)
    recs = read_log(os.path.join(out, "train_log.jsonl"))
    assert 4 <= result["steps"] <= 12 and recs[-1]["step"] == result["steps"]
    assert 4.0 <= result["train_s"] <= 5.0  # stopped when the time was up ...
    assert recs[-1]["lr"] < 0.1 * 5e-3  # ... with the cosine fitted to it: it ended near zero


def test_frozen_batchnorm_keeps_running_stats(data, tmp_path):
    out = tmp_path / "frozen"
    train(tiny_cfg(data, out, "bce", steps=2, batchnorm="frozen"))
    state = load_checkpoint(out / "model.pt")["model"]
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert means and all(torch.count_nonzero(m) == 0 for m in means)


def test_backbone_lr_mult_slows_only_the_encoder(data, tmp_path):
    """train.backbone_lr_mult = 0: the encoder's weights stay where they started (same seed, so
    two runs of different lengths agree on them) while the rest trains; at 1 they move."""
    def weights(mult, steps):
        out = tmp_path / f"m{mult}_{steps}"
        train(tiny_cfg(data, out, "ncl", steps=steps, backbone_lr_mult=mult))
        state = load_checkpoint(out / "model.pt")["model"]
        split = lambda head: {k: v for k, v in state.items()
                              if k.startswith("backbone.") != head and v.is_floating_point()
                              and "running_" not in k}
        return split(False), split(True)
    (enc2, head2), (enc4, head4) = weights(0.0, 2), weights(0.0, 4)
    assert enc2 and all(torch.equal(enc2[k], enc4[k]) for k in enc2)
    assert any(not torch.equal(head2[k], head4[k]) for k in head2)
    (enc2, _), (enc4, _) = weights(1.0, 2), weights(1.0, 4)
    assert any(not torch.equal(enc2[k], enc4[k]) for k in enc2)
    with pytest.raises(ConfigError, match="train.backbone_lr_mult"):
        load_config(None, ["train.backbone_lr_mult=-1"])
    # the optimiser's state is per group: a resume must keep the value, or be told so
    ckpt = tmp_path / "m0.0_2" / "model.pt"
    with pytest.raises(ConfigError, match="backbone_lr_mult = 0.0, not 1.0"):
        train(tiny_cfg(data, tmp_path / "r1", "ncl", steps=4, backbone_lr_mult=1.0), resume=str(ckpt))
    train(tiny_cfg(data, tmp_path / "r0", "ncl", steps=4, backbone_lr_mult=0.0), resume=str(ckpt))
    assert torch.equal(load_checkpoint(tmp_path / "r0" / "model.pt")["model"]["backbone.trunk.stem.0.weight"],
                       load_checkpoint(ckpt)["model"]["backbone.trunk.stem.0.weight"])


# --------------------------------------------------------------------------- evaluate, predict
def test_evaluate_and_predict_from_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(data, out, "ncl", steps=2)
    cfg["data"]["test"] = str(data / "test")
    cfg["data"]["input_filter"] = "highpass"
    result = train(cfg)
    for key in REQUIRED_KEYS:
        assert key in result["metrics"]["test"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["n_images"] == 4

    model, method, state = model_from_checkpoint(out / "model.pt")
    assert not model.training and state["config"]["data"]["size"] == 32
    ds = build_dataset(str(data / "test" / "list.json"), state["config"]["data"], train=False)
    seen = []
    m = evaluate(model, method, ds, batch_size=3, on_batch=lambda b, p: seen.append(p.shape[0]),
                 input_filter_kind="highpass")
    assert seen == [3, 1] and m["n_images"] == 4 and m["n_tampered"] == 3
    for key in REQUIRED_KEYS:
        assert key in m
    assert m["pixel_f1"] == pytest.approx(result["metrics"]["test"]["pixel_f1"], abs=1e-6)

    # Whole images of another size: the map comes back at the original resolution.
    img = (np.random.default_rng(0).random((45, 71, 3)) * 255).astype(np.uint8)
    for mode in ("resize", "pad"):
        prob = predict_image(model, method, img, size=32, mode=mode, input_filter_kind="highpass")
        assert prob.shape == (45, 71) and prob.dtype == np.float32
        assert 0.0 <= prob.min() <= prob.max() <= 1.0
    tile = panel(img, prob, np.zeros((45, 71), np.uint8))
    assert tile.shape[0] == 45 + 18 and tile.dtype == np.uint8
    assert loss_curve(str(out / "train_log.jsonl"), str(tmp_path / "curve.png"))
    assert cv2.imread(str(tmp_path / "curve.png")) is not None


def test_robustness_sweep(data, tmp_path):
    from fastiml.engine import robustness
    train(tiny_cfg(data, tmp_path / "r", "bce", steps=1))
    model, method, state = model_from_checkpoint(tmp_path / "r" / "model.pt")
    out = robustness(model, method, str(data / "test"), size=32, mode="resize",
                     protocol={"jpeg": [90, 50], "gaussian_blur": [3]}, batch_size=4)
    assert set(out) == {"jpeg", "gaussian_blur"} and set(out["jpeg"]) == {"90", "50"}
    for m in (out["jpeg"]["50"], out["gaussian_blur"]["3"]):
        assert m["n_images"] == 4 and all(k in m for k in REQUIRED_KEYS)


def test_input_filter():
    from fastiml.engine.evaluate import input_filter
    x = torch.rand(2, 3, 16, 16)
    assert input_filter(x, "none") is x
    flat = input_filter(torch.full((1, 3, 8, 8), 0.3), "highpass")
    torch.testing.assert_close(flat, torch.full_like(flat, 0.5))  # no residual in a flat image
    y = input_filter(x.clone(), "highpass")
    assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0
    with pytest.raises(ValueError, match="highpass"):
        input_filter(x, "sobel")


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a fastiml checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a fastiml checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_truncated_checkpoint_error_is_one_sentence_of_ours(tmp_path):
    whole = tmp_path / "whole.pt"
    save_checkpoint(str(whole), model=torch.nn.Linear(64, 64), method_name="bce",
                    method_options={}, config={})
    blob = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in (0, 3, 100, len(blob) // 2, len(blob) - 1):  # cut anywhere, even in the header
        cut.write_bytes(blob[:size])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(cut)
        assert str(e.value) == (
            f"checkpoint {cut} is truncated ({size} bytes, without the end of the archive "
            "torch.save writes): use another checkpoint of the run (an earlier "
            "checkpoints/step_*.pt or checkpoints/last.pt) or copy the file again")


# ------------------------------------------------------------------------------ progress bar
def test_progress_bar_output(data, tmp_path, capsys):
    """What a user sees on stderr: plain lines every log_every steps when stderr is not a
    terminal (here, through a real training run), and one line redrawn in place on a terminal."""
    import io
    from fastiml.engine.progress import Progress

    train(tiny_cfg(data, tmp_path / "p", "bce", steps=4, progress=True, log_every=2))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split(" ")[1] for line in lines] == ["2/4", "4/4"]
    for line in lines:
        assert " loss " in line and " lr " in line and "img/s" in line and "ETA " in line
        loss = float(line.split(" loss ")[1].split(" ")[0])
        assert math.isfinite(loss) and loss > 0

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    bar = Progress(stream=term, every=1, width=10)
    bar.update(1, 4, stage="train", loss=0.5, eta_s=65.0, force=True)
    bar.update(4, 4, stage="train", loss=0.25, eta_s=0.0, force=True)
    bar.close()
    text = term.getvalue()
    assert text.count("\r\033[K") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "[train] step 1/4 |##--------| loss 0.5000" in text and "ETA 1m05s" in text
    assert "[train] step 4/4 |##########| loss 0.2500" in text
