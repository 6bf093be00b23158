"""Exact resume anywhere in an epoch: a run stopped by SIGTERM after step k and resumed from the
checkpoint it saved ends with the weights of the uninterrupted run, bit for bit, with
augmentation, ASPP dropout and two loader workers on. The signal is sent by a hook at a chosen
step, never by timing."""
import importlib
import os
import signal

import pytest
import torch

from fastiml.data import synthesize
from fastiml.engine import TrainingInterrupted, load_checkpoint, load_config, train

engine_train = importlib.import_module("fastiml.engine.train")
TINY = {"encoder": "resnet18", "base_width": 8, "decoder_channels": 16, "proj_dim": 16}
PER_EPOCH = 6  # 12 images, batch 2
STEPS = 9  # epoch 0: steps 1-6, epoch 1: steps 7-9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    synthesize(root, 2 * PER_EPOCH, size=32, seed=41, authentic_fraction=0.25)
    return root


def cfg_for(data, out):
    cfg = load_config(None, [
        f"data.train={data / 'list.json'}", "data.size=32", "data.augment=true",
        "data.preload=false", "data.num_workers=2", "train.method=bce", f"train.steps={STEPS}",
        "train.batch_size=2", "train.lr=5e-3", "train.warmup_steps=2", "train.log_every=1",
        "train.threads=1", "train.progress=false", f"output.dir={out}"])
    cfg["method"] = {"model": dict(TINY)}
    return cfg


def signal_at(monkeypatch, step, signum=signal.SIGTERM):
    """Send ``signum`` to this process once the run has reported ``step``."""
    report = engine_train._Run._report

    def hooked(self, st, lr, now):
        report(self, st, lr, now)
        if self.step == step:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(engine_train._Run, "_report", hooked)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(cfg_for(data, out), log=lambda s: None)
    return load_checkpoint(out / "model.pt")["model"]


@pytest.mark.parametrize("stop", [1, 2, 3, 5, 8])  # all inside an epoch (6 steps each)
def test_resume_inside_an_epoch_is_bit_exact(data, tmp_path, monkeypatch, uninterrupted, stop):
    assert stop % PER_EPOCH != 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_at(m, stop)
        with pytest.raises(TrainingInterrupted, match=f"SIGTERM at step {stop};"):
            train(cfg_for(data, out), log=lambda s: None)
    last = out / "checkpoints" / "last.pt"
    progress = load_checkpoint(last)["progress"]
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (
        stop, stop // PER_EPOCH, stop % PER_EPOCH)
    result = train(load_config(out / "config.toml"), resume=str(last), log=lambda s: None)
    assert result["steps"] == STEPS
    final = load_checkpoint(out / "model.pt")["model"]
    assert final.keys() == uninterrupted.keys()
    differ = [k for k, v in uninterrupted.items() if not torch.equal(final[k], v)]
    assert not differ, f"resumed after step {stop}: {len(differ)} tensors differ, e.g. {differ[0]}"
