"""Training that survives what a long run meets: non-finite losses (skipped, then a stop with an
error), an exploding update (a stop naming the last sound checkpoint), SIGTERM (a resumable
checkpoint; the resumed run ends where an uninterrupted one does), an ignored SIGINT (left
ignored), time-based checkpoints, stale temporary files, unreadable data files, mixed precision;
and the global state train() must leave as it found it."""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastiml.data import synthesize
from fastiml.engine import (TrainingDiverged, TrainingInterrupted, build_method, config_to_toml,
                            load_checkpoint, load_config, train)
from fastiml.engine.guards import non_finite_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = {"encoder": "resnet18", "base_width": 8, "decoder_channels": 16, "proj_dim": 16}
engine_train = importlib.import_module("fastiml.engine.train")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_data")
    synthesize(root, 4, size=32, seed=31, authentic_fraction=0.25)
    return root


def tiny_cfg(data, out, steps=4, method="bce", **train_keys):
    overrides = [f"data.train={data / 'list.json'}", "data.size=32", "data.augment=false",
                 "data.preload=true", "data.num_workers=0", f"train.method={method}",
                 f"train.steps={steps}", "train.batch_size=2", "train.lr=5e-3",
                 "train.warmup_steps=0", "train.log_every=1", "train.threads=2",
                 "train.progress=false", f"output.dir={out}"]
    overrides += [f"train.{k}={v}" for k, v in train_keys.items()]
    cfg = load_config(None, overrides)
    cfg["method"] = {"model": dict(TINY)}
    return cfg


def strict_json_lines(path):
    """The records of a JSON-lines file, refusing the non-standard NaN / Infinity tokens."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token} in {path}")
    return [json.loads(line, parse_constant=refuse)
            for line in Path(path).read_text().splitlines() if line.strip()]


def all_checkpoints(out):
    return sorted(Path(out).rglob("*.pt"))


class NaNLoss:
    """Wraps a method so that the loss of the listed (0-based, per process) calls is NaN."""

    def __init__(self, monkeypatch, calls):
        self.calls, self.n = set(calls), 0
        original = engine_train.build_method

        def build(cfg):
            method = original(cfg)
            inner = method.training_loss

            def training_loss(net, batch, stage):
                loss, parts = inner(net, batch, stage)
                i, self.n = self.n, self.n + 1
                return (loss * math.nan if i in self.calls else loss), parts
            method.training_loss = training_loss
            return method
        monkeypatch.setattr(engine_train, "build_method", build)


# --------------------------------------------------------------------------- non-finite steps
def test_non_finite_steps_are_skipped_without_update(data, tmp_path, monkeypatch):
    NaNLoss(monkeypatch, calls=range(100))  # every step
    out = tmp_path / "skip"
    result = train(tiny_cfg(data, out, steps=3, max_nonfinite_steps=0), log=lambda s: None)
    assert result["steps"] == 3 and result["skipped_steps"] == 3
    # No update at all: parameters and BatchNorm statistics are those of the seeded initial model.
    torch.manual_seed(0)
    init = build_method(tiny_cfg(data, out)).build_model().state_dict()
    final = load_checkpoint(out / "model.pt")["model"]
    for k, v in init.items():
        if v.is_floating_point():
            assert torch.equal(final[k], v), k
    recs = strict_json_lines(out / "train_log.jsonl")
    assert [r["loss"] for r in recs] == [None] * 3  # null, not NaN
    assert [r["skipped_steps_total"] for r in recs] == [1, 2, 3]


def test_one_bad_step_is_skipped_and_training_goes_on(data, tmp_path, monkeypatch):
    NaNLoss(monkeypatch, calls={1})
    out = tmp_path / "one"
    result = train(tiny_cfg(data, out, steps=4), log=lambda s: None)
    assert result["steps"] == 4 and result["skipped_steps"] == 1
    recs = strict_json_lines(out / "train_log.jsonl")
    assert [r["skipped_steps"] for r in recs] == [0, 1, 0, 0]
    assert recs[1]["loss"] is None and all(math.isfinite(r["loss"]) for r in recs if r["step"] != 2)


def test_consecutive_non_finite_steps_stop_the_run(data, tmp_path, monkeypatch):
    NaNLoss(monkeypatch, calls=range(2, 100))
    out = tmp_path / "stop"
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(3-5") as e:
        train(tiny_cfg(data, out, steps=20, max_nonfinite_steps=3, ckpt_every=1),
              log=lambda s: None)
    # Steps 3 and 4 wrote checkpoints too, but of steps whose loss was NaN: step 2's is named.
    assert (out / "checkpoints" / "step_0000004.pt").exists()
    assert str(e.value).endswith("Last checkpoint with a finite loss and a sane update: "
                                 f"{out / 'checkpoints' / 'step_0000002.pt'}")
    assert not (out / "model.pt").exists()
    recs = strict_json_lines(out / "train_log.jsonl")
    assert recs[-1] == {"event": "diverged", "step": 5, "skipped_steps": 3}
    for path in all_checkpoints(out):
        assert not non_finite_weights(load_checkpoint(path)["model"]), path


def test_exploding_update_stops_before_its_checkpoint(data, tmp_path, monkeypatch):
    """Step 3's update multiplies the weights by ~1e30 but leaves them finite: the run stops
    before writing step 3's checkpoint, and names step 2's (not a checkpoint of 1e30 weights)."""
    factor = engine_train.WarmupCosine.factor
    monkeypatch.setattr(engine_train.WarmupCosine, "factor",  # lr 5e-3 -> 5e29 from step 3
                        lambda self, k: factor(self, k) * (1e32 if k >= 2 else 1.0))
    out = tmp_path / "explode"
    with pytest.raises(TrainingDiverged, match="the update of step 3 took the weights' 2-norm "
                       r"from \S+ to \S+e\+3\d ") as e:
        train(tiny_cfg(data, out, steps=10, ckpt_every=1), log=lambda s: None)
    assert str(e.value).endswith("Last checkpoint with a finite loss and a sane update: "
                                 f"{out / 'checkpoints' / 'step_0000002.pt'}")
    assert [p.name for p in all_checkpoints(out)] == ["step_0000001.pt", "step_0000002.pt"]
    assert strict_json_lines(out / "train_log.jsonl")[-1] == {
        "event": "diverged", "step": 3, "exploding_update": 3}


def test_huge_learning_rate_stops_from_the_command_line(data, tmp_path):
    """The issue's target: ``--set train.lr=1e30`` stops by itself, exit status != 0, and leaves
    no checkpoint of the exploded weights (finite, ~1e30): none at all, as step 1 exploded."""
    out = tmp_path / "lr"
    cfg = tiny_cfg(data, out, steps=200, ckpt_every=1, log_every=5)
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    p = subprocess.run([sys.executable, "-m", "fastiml", "train", "--config", str(tmp_path / "c.toml"),
                        "--set", "train.lr=1e30"], capture_output=True, text=True, timeout=600,
                       env=_env())
    assert p.returncode == 2, p.stderr
    assert "fastiml: error: training diverged" in p.stderr and "Traceback" not in p.stderr
    assert "the update of step 1 took the weights' 2-norm" in p.stderr
    assert "Last checkpoint with a finite loss and a sane update: none" in p.stderr
    assert all_checkpoints(out) == []
    strict_json_lines(out / "train_log.jsonl")


# ------------------------------------------------------------------------------ interruption
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "2"
    env.pop("FASTIML_DEBUG", None)
    return env


#: The child runs the real command; a hook sends it SIGTERM once step STOP is reported.
SIGTERM_AT = """
import importlib, os, signal, sys
t = importlib.import_module("fastiml.engine.train")
from fastiml.cli import main
report = t._Run._report
def hooked(self, st, lr, now):
    report(self, st, lr, now)
    if self.step == STOP:
        os.kill(os.getpid(), signal.SIGTERM)
t._Run._report = hooked
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_saves_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(data, tmp_path):
    """Through the command line: SIGTERM after step 3, inside epoch 1 (2 steps per epoch), with
    augmentation and 2 loader workers; ``--resume`` ends bit-equal to the uninterrupted run."""
    steps, stop = 6, 3

    def cfg(out):
        c = tiny_cfg(data, out, steps=steps, threads=1)
        c["data"].update(preload=False, augment=True, num_workers=2)
        return c
    out = tmp_path / "interrupted"
    config = tmp_path / "c.toml"
    config.write_text(config_to_toml(cfg(out)))
    child = subprocess.run([sys.executable, "-c", SIGTERM_AT.replace("STOP", str(stop)), "train",
                            "--config", str(config)], capture_output=True, text=True,
                           timeout=600, env=_env())
    assert child.returncode == 128 + signal.SIGTERM, child.stderr
    last = out / "checkpoints" / "last.pt"
    resume = f"resume with: fastiml train --config {out / 'config.toml'} --resume {last}"
    assert resume in child.stderr
    state = load_checkpoint(last)
    assert state["optimizer"] is not None
    assert (state["progress"]["step"], state["progress"]["batch_in_epoch"]) == (stop, 1)
    assert strict_json_lines(out / "train_log.jsonl")[-1]["event"] == "interrupted"

    resumed = subprocess.run([sys.executable, "-m", "fastiml", "train", "--config",
                              str(out / "config.toml"), "--resume", str(last)],
                             capture_output=True, text=True, timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    full = train(cfg(tmp_path / "full"), log=lambda s: None)
    assert full["steps"] == steps
    a = load_checkpoint(out / "model.pt")
    b = load_checkpoint(tmp_path / "full" / "model.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == steps
    assert [k for k, v in b["model"].items() if not torch.equal(a["model"][k], v)] == []


def test_sigint_in_process_and_time_based_checkpoints(data, tmp_path, monkeypatch):
    now = [0.0]

    def clock():  # 0.2 s per reading: checkpoints/last.pt falls due every few steps
        now[0] += 0.2
        return now[0]
    monkeypatch.setattr(engine_train, "_clock", clock)
    out = tmp_path / "sigint"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / ".tmp_abc.pt"  # what a killed checkpoint write leaves
    stale.write_bytes(b"partial")
    calls = []
    original = engine_train._Run._report

    def report(self, st, lr, t):
        original(self, st, lr, t)
        calls.append(self.step)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(engine_train._Run, "_report", report)

    def previous(signum, frame):  # whatever handler was there (a background job has SIG_IGN)
        raise AssertionError("train() let a signal through to the previous handler")
    before = signal.signal(signal.SIGINT, previous), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(TrainingInterrupted, match="SIGINT at step 5") as e:
            train(tiny_cfg(data, out, steps=10, ckpt_minutes=0.01), log=lambda s: None)
        # put back as they were
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (
            previous, before[1])
    finally:
        signal.signal(signal.SIGINT, before[0])
    assert e.value.signum == signal.SIGINT and calls == [1, 2, 3, 4, 5]
    assert not stale.exists()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["step"] == 5
    monkeypatch.setattr(engine_train._Run, "_report", original)
    saved = []
    monkeypatch.setattr(engine_train, "save_checkpoint",
                        lambda path, **kw: saved.append((os.path.basename(path),
                                                         kw["progress"]["step"])))
    train(tiny_cfg(data, tmp_path / "timed", steps=10, ckpt_minutes=0.01), log=lambda s: None)
    # 0.6 s = 3 readings per step: a time-based checkpoint every ~1 step, never a step number.
    timed = [s for name, s in saved if name == "last.pt"]
    assert len(timed) >= 3 and saved[-1] == ("model.pt", 10)


def test_an_ignored_sigint_stays_ignored(data, tmp_path, monkeypatch):
    """A run started with SIGINT ignored (``cmd &``, ``nohup``) is not interrupted by SIGINT,
    leaves it ignored, and still stops on SIGTERM with a resumable checkpoint."""
    seen = []
    original = engine_train._Run._report

    def report(self, st, lr, t):
        original(self, st, lr, t)
        seen.append(signal.getsignal(signal.SIGINT))
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the run goes on
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine_train._Run, "_report", report)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "nohup"
    try:
        with pytest.raises(TrainingInterrupted, match="SIGTERM at step 4"):
            train(tiny_cfg(data, out, steps=10), log=lambda s: None)
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, before[0])
    assert seen == [signal.SIG_IGN] * 4
    assert after == (signal.SIG_IGN, before[1])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["step"] == 4


# --------------------------------------------------------------------------------- global state
def test_train_restores_threads_and_rngs(data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1234)
        expected = torch.rand(3)
        torch.manual_seed(1234)
        train(tiny_cfg(data, tmp_path / "g", steps=1), log=lambda s: None)  # train.threads = 2
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.rand(3), expected)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- bad files
def test_on_error_from_the_config(data, tmp_path):
    folder = tmp_path / "broken"
    synthesize(folder, 4, size=32, seed=32, authentic_fraction=0.0)
    bad = sorted((folder / "Tp").iterdir())[0]
    bad.write_bytes(b"not an image")
    cfg = tiny_cfg(data, tmp_path / "r", steps=1)
    cfg["data"]["train"] = [str(data / "list.json"), str(folder)]
    cfg["data"]["test"] = str(folder)
    cfg["data"]["on_error"] = "raise"
    with pytest.raises(ValueError, match=bad.name):
        train(cfg, log=lambda s: None)
    cfg["data"]["on_error"] = "warn"
    cfg["output"]["dir"] = str(tmp_path / "w")
    with pytest.warns(UserWarning, match=bad.name):
        train(cfg, log=lambda s: None)
    events = [r for r in strict_json_lines(tmp_path / "w" / "train_log.jsonl")
              if r.get("event") == "skipped_files"]
    assert [(r["split"], [f["file"] for f in r["files"]]) for r in events] == [
        ("train", [str(bad)]), ("test", [str(bad)])]
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert [f["file"] for f in metrics["test"]["skipped"]] == [str(bad)]
    with pytest.raises(Exception, match="data.on_error must be one of warn, raise"):
        load_config(None, ["data.on_error=ignore"])


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_steps(data, tmp_path, monkeypatch, amp):
    """CPU autocast training per dtype: the convolutions of the training steps run in the reduced
    dtype (a forward hook records their output dtypes), the first loss differs from the fp32 one
    by more than fp32 rounding yet stays close (same batch, same initial weights), the weights
    move, and fp16 runs through its GradScaler (whose first steps may overflow at the initial
    scale 2**16: skipped, and the scale lowered)."""
    first_loss, conv_dtypes = {}, {}
    original = engine_train.build_method

    def build(cfg):
        method = original(cfg)
        inner, build_model = method.training_loss, method.build_model
        dtypes = conv_dtypes.setdefault(cfg["train"]["amp"], set())

        def record(module, inputs, output):
            if module.training:  # not the final evaluation
                dtypes.add(output.dtype)

        def hooked_model():
            model = build_model()
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.register_forward_hook(record)
            return model

        def training_loss(net, batch, stage):
            loss, parts = inner(net, batch, stage)
            first_loss.setdefault(cfg["train"]["amp"], (float(loss.detach()), loss.dtype))
            return loss, parts
        method.build_model, method.training_loss = hooked_model, training_loss
        return method
    monkeypatch.setattr(engine_train, "build_method", build)
    steps = 6
    for mode in (amp, "off"):
        result = train(tiny_cfg(data, tmp_path / mode, steps=steps, amp=mode), log=lambda s: None)
    reduced = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert conv_dtypes == {amp: {reduced}, "off": {torch.float32}}
    assert first_loss[amp][0] == pytest.approx(first_loss["off"][0], rel=0.05)
    # bf16 / fp16 rounding moves the loss far more than float32's (2**-24 relative) would
    assert abs(first_loss[amp][0] - first_loss["off"][0]) > 2**-20 * abs(first_loss["off"][0])
    assert first_loss["off"][1] == torch.float32
    assert result["skipped_steps"] == 0  # fp32
    recs = strict_json_lines(tmp_path / amp / "train_log.jsonl")
    skipped = recs[-1]["skipped_steps_total"]
    state = load_checkpoint(tmp_path / amp / "model.pt")
    if amp == "bf16":
        assert skipped == 0 and state["scaler"] is None
    else:
        assert skipped < steps and state["scaler"]["scale"] == 2.0 ** (16 - skipped)
    torch.manual_seed(0)
    init = build_method(tiny_cfg(data, tmp_path)).build_model().state_dict()
    moved = [k for k, v in state["model"].items() if v.is_floating_point()
             and not torch.equal(v, init[k])]
    assert any(k.startswith("backbone.") for k in moved)
