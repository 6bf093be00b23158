"""DDP through the engine: two processes (gloo, loopback) take two training steps of the bce
method, and of ncl (whose contrastive terms gather rows across ranks); the parameters after them
must equal those of one process stepping on the union of the two ranks' batches.

Exactness needs a model whose gradient does not depend on how the batch is split, nor on random
draws. BatchNorm in training mode normalises with per-rank batch statistics, so the engine's
``train.batchnorm = "frozen"`` is used: BatchNorm layers run on their running statistics (eval
mode) while their affine weights still train. NCLNet's ASPP has a dropout layer, whose masks are
drawn per process; it is switched off (``nn.Dropout.forward`` patched to the identity) in both
runs. Every other layer is per-sample. DDP averages the ranks' gradients;
each rank's loss is a mean over its (equal-sized) batch, so the average is the gradient of the
mean over the union. The proj heads of NCLNet are unused by bce, which also checks that DDP's
``find_unused_parameters`` leaves them untouched, as a single process does.
"""
import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from fastiml.data import synthesize
from fastiml.engine import build_method, load_checkpoint, load_config, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(data, out, batch_size, method="bce"):
    cfg = load_config(None, [
        f"data.train={data}", "data.size=32", "data.augment=false", "data.preload=true",
        "data.num_workers=0", f"train.method={method}", "train.steps=2",
        f"train.batch_size={batch_size}",
        "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=1", "train.threads=1",
        "train.progress=false", "train.batchnorm=frozen", "train.grad_clip=0.5",
        "train.device=cpu", f"output.dir={out}"])
    cfg["method"] = {"model": {"base_width": 8, "decoder_channels": 16, "proj_dim": 16}}
    if method == "ncl":  # 2 x 2 patches of the stride-4 projections: 4 x 4 cells per image
        cfg["method"]["loss"] = {"patch": 2}
    return cfg


def _no_dropout(self, x):
    return x


def _worker(rank, world, port, data, out, errors, method):
    try:
        torch.nn.Dropout.forward = _no_dropout  # a disposable process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        result = train(_cfg(data, out, batch_size=2, method=method), log=lambda s: None)
        assert result["steps"] == 2
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


@pytest.mark.parametrize("method", ["bce", "ncl"])
def test_ddp_step_equals_single_process_step(tmp_path, monkeypatch, method):
    data = tmp_path / "data"
    synthesize(data, 4, size=32, seed=21, authentic_fraction=0.25)
    source = str(data / "list.json")

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, source, str(tmp_path / "ddp"), errors,
                                               method))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errors.empty():
        pytest.fail(errors.get())
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert not os.environ.get("WORLD_SIZE")  # the parent stayed single-process

    monkeypatch.setattr(torch.nn.Dropout, "forward", _no_dropout)
    train(_cfg(source, str(tmp_path / "single"), batch_size=4, method=method), log=lambda s: None)
    ddp = load_checkpoint(tmp_path / "ddp" / "model.pt")
    single = load_checkpoint(tmp_path / "single" / "model.pt")
    # Float sums run in another order; Adam divides by |gradient|, so an element whose gradient is
    # near zero can move by a rounding-sized fraction of one step: tolerance 1 % of lr.
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-4, msg=key)
    # The logged loss is the mean over ranks: the single process's loss on the union.
    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("ddp", "single")]
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # The step did move the weights (both runs start from train.seed = 0) ...
    torch.manual_seed(0)
    init = build_method(_cfg(source, str(tmp_path / "x"), 4, method)).build_model().state_dict()
    moved = [k for k, v in single["model"].items()
             if v.is_floating_point() and not torch.equal(v, init[k])]
    assert any(k.startswith("backbone.") for k in moved)
    # ... the projection heads only with ncl's contrast: bce does not use them (no gradient,
    # AdamW skips them), ncl gathers their rows across ranks.
    proj_moved = any(k.startswith(("branch_a.proj", "branch_b.proj")) for k in moved)
    assert proj_moved == (method == "ncl")
    # Only rank 0 wrote the outputs.
    assert (tmp_path / "ddp" / "train_log.jsonl").is_file()
    assert ddp["progress"]["step"] == 2
