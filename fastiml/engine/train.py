"""The training loop: any :mod:`fastiml.methods` method, its stages, AdamW with a warm-up + cosine
schedule per stage, autocast, gradient clipping, DDP, checkpoints, time budgets.

    from fastiml.engine import load_config, train
    result = train(load_config("my.toml", ["train.lr=3e-4"]))

Per stage (a method lists its stages as (name, fraction)): ``method.start_stage`` returns the
parameters to train; a fresh AdamW and schedule are built for them; the stage gets its fraction
of the steps (``train.steps``, or ``train.epochs`` x batches per epoch) and, with
``train.time_budget_s``, its fraction of the time. Under a time budget the first steps are
measured and the stage's step count -- hence the cosine's length -- is re-fitted after every
step to the time left (all ranks agree on it), so the schedule ends when the time does.

Outputs in ``output.dir`` (rank 0 only): ``config.toml`` (resolved), ``train_log.jsonl``,
``checkpoints/step_*.pt`` (every ``train.ckpt_every`` steps and at the end of every stage but the
last), ``model.pt`` (the final checkpoint: resumable, and what ``eval`` / ``predict`` load),
``metrics.json`` (``{"val": ..., "test": ...}`` for the sources given).

The engine never looks at the method's name: everything method-specific is behind the method's
``stages``, ``build_model``, ``start_stage``, ``training_loss`` and ``predict``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fastiml import methods
from fastiml.data import Augment, ForgeryDataset
from fastiml.engine import distributed as D
from fastiml.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap
from fastiml.engine.config import ConfigError, config_to_toml
from fastiml.engine.evaluate import autocast, evaluate, input_filter, resolve_amp
from fastiml.engine.progress import JsonlLog, Progress, Window, format_duration

#: The loop's clock (tests replace it with a fake one to check time budgets deterministically).
_clock = time.perf_counter

__all__ = ["train", "WarmupCosine", "InMemoryDataset", "build_dataset", "build_method",
           "plan_stages"]


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up then cosine decay, over a step count that may be re-fitted on the way.

    The learning rate of step k (0-based) is ``base * f(k)`` with, for ``w = min(warmup_steps,
    total_steps // 4)``: ``f(k) = (k + 1) / w`` for ``k < w``, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * min(1, (k - w) / (total_steps - w)))) / 2``.
    :meth:`set_total` changes ``total_steps`` (a time-budgeted run refits it as it measures its
    speed); the state dict keeps it.
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0,
                 last_epoch: int = -1):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_ratio = float(min_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, k: int) -> float:
        total = self.total_steps
        w = min(self.warmup_steps, total // 4)
        if k < w:
            return (k + 1) / w
        progress = min(1.0, (k - w) / max(1, total - w))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> List[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def set_total(self, total_steps: int) -> None:
        """Re-fit the schedule to ``total_steps``; the current step's lr is updated at once."""
        total_steps = max(1, int(total_steps))
        if total_steps == self.total_steps:
            return
        self.total_steps = total_steps
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class InMemoryDataset(Dataset):
    """A data set decoded once into memory (uint8), for small data sets such as the demo's.

    Items are those of the source data set (``image`` float [3, S, S] in [0, 1], ``mask``,
    ``valid``, ``label``, ``name``, ``size``). With ``augment``, each item is flipped horizontally
    and vertically and rotated by a multiple of 90 degrees at random (torch's RNG), image, mask and
    valid map together -- the cheap geometric part of :class:`fastiml.data.Augment`, applied to
    the stored (already resized) tensors.
    """

    def __init__(self, source: Dataset, augment: bool = False):
        images, masks, valids, labels, names, sizes = [], [], [], [], [], []
        for i in range(len(source)):
            item = source[i]
            images.append(item["image"].mul(255.0).round_().to(torch.uint8))
            masks.append(item["mask"] > 0.5)
            valids.append(item["valid"].bool())
            labels.append(item["label"])
            names.append(item["name"])
            sizes.append(item["size"])
        self.images = torch.stack(images)
        self.masks = torch.stack(masks)
        self.valids = torch.stack(valids)
        self.labels = torch.stack(labels)
        self.sizes = torch.stack(sizes)
        self.names = names
        self.augment = bool(augment)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Dict:
        image, mask, valid = self.images[i], self.masks[i], self.valids[i]
        if self.augment:
            r = torch.randint(0, 2, (3,)).tolist()
            k = int(torch.randint(0, 4, ()).item())
            if r[0]:
                image, mask, valid = image.flip(-1), mask.flip(-1), valid.flip(-1)
            if r[1]:
                image, mask, valid = image.flip(-2), mask.flip(-2), valid.flip(-2)
            if k and image.shape[-1] == image.shape[-2]:
                image, mask, valid = (image.rot90(k, (-2, -1)), mask.rot90(k, (-2, -1)),
                                      valid.rot90(k, (-2, -1)))
        return {"image": image.float().div_(255.0), "mask": mask.float(), "valid": valid.clone(),
                "label": self.labels[i], "name": self.names[i], "size": self.sizes[i]}


def _has_source(src) -> bool:
    return bool(src) if not isinstance(src, list) else len(src) > 0


def build_dataset(source, data_cfg: Dict, train: bool) -> Dataset:
    """The training (``train=True``: augmentation / preload as configured) or evaluation data set
    of ``source`` under the config's ``[data]`` table."""
    size, mode = data_cfg["size"], data_cfg["mode"]
    if not train:
        return ForgeryDataset(source, size=size, mode=mode)
    if data_cfg["preload"]:
        return InMemoryDataset(ForgeryDataset(source, size=size, mode=mode),
                               augment=data_cfg["augment"])
    return ForgeryDataset(source, size=size, mode=mode,
                          augment=Augment() if data_cfg["augment"] else None)


class _EpochSampler(Sampler):
    """DistributedSampler (shuffled per (seed, epoch), ``drop_last``) that can skip the items a
    resumed run already consumed in its first epoch."""

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


class _Batches:
    """Endless batches over epochs; knows the epoch and the batches consumed in it."""

    def __init__(self, loader: DataLoader, sampler: _EpochSampler, batches_per_epoch: int,
                 epoch: int = 0, batch_in_epoch: int = 0):
        self.loader, self.sampler = loader, sampler
        self.per_epoch = batches_per_epoch
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.it = None
        self.batch_size = loader.batch_size

    def next(self):
        while True:
            if self.it is None:
                if self.batch_in_epoch >= self.per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.batch_size)
                self.it = iter(self.loader)
            try:
                batch = next(self.it)
            except StopIteration:
                self.it = None
                self.batch_in_epoch = self.per_epoch
                continue
            self.batch_in_epoch += 1
            return batch


def _to_device(batch: Dict, device: torch.device) -> Dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def build_method(cfg: Dict):
    """``methods.build(train.method, **[method])``; ConfigError naming the problem."""
    name = cfg["train"]["method"]
    try:
        return methods.build(name, **copy.deepcopy(cfg["method"]))
    except (ValueError, TypeError) as e:
        if name not in methods.available():
            raise ConfigError(f"unknown method {name!r} (config key train.method); available: "
                              f"{', '.join(sorted(methods.available()))}") from None
        raise ConfigError(f"bad [method] options for method {name!r}: {e}") from None


def plan_stages(fractions: Sequence[float], total: int) -> List[int]:
    """Split ``total`` steps over stages by their fractions (each stage gets at least 1 step)."""
    fr = np.asarray(fractions, dtype=np.float64)
    fr = fr / fr.sum()
    bounds = np.round(np.cumsum(fr) * total).astype(np.int64)
    counts = np.diff(np.concatenate([[0], bounds])).tolist()
    return [max(1, int(c)) for c in counts]


def _set_train_mode(model: nn.Module, batchnorm: str) -> None:
    model.train()
    if batchnorm == "frozen":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def _param_groups(params: Sequence[nn.Parameter], weight_decay: float) -> List[Dict]:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _number(x) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(cfg: Dict, resume: Optional[str] = None, log: Optional[Callable[[str], None]] = None
          ) -> Dict:
    """Train as ``cfg`` (a :func:`fastiml.engine.load_config` dict) says; see the module docstring.

    Args:
        cfg: validated config.
        resume: a checkpoint written by a previous run of the same method: model, optimizer,
            schedule, RNG and position (stage, step, epoch, batch) are restored and training
            continues from the step after it.
        log: where one-line messages go (default: stderr on rank 0).

    Returns (on every rank) a dict: ``output_dir``, ``checkpoint`` (model.pt), ``steps``,
    ``elapsed_s``, ``train_s``, ``data_wait_fraction``, ``imgs_per_s``, ``final_loss``,
    ``metrics`` (``{"val": ..., "test": ...}``).
    """
    tc, dc = cfg["train"], cfg["data"]
    info = D.init_from_env(tc["device"])
    try:
        return _train(cfg, tc, dc, info, resume, log)
    finally:
        D.teardown(info)


def _train(cfg, tc, dc, info: D.DistInfo, resume, log) -> Dict:
    t_begin = _clock()
    device = info.device
    main = info.is_main
    out_dir = cfg["output"]["dir"]
    progress = Progress(enabled=main and tc["progress"], every=max(1, tc["log_every"]))

    def say(text: str) -> None:
        if log is not None:
            log(text)
        elif main:
            progress.close()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    if tc["threads"] > 0:
        torch.set_num_threads(tc["threads"])
    if tc["batchnorm"] == "sync" and info.distributed and device.type != "cuda":
        raise ConfigError("train.batchnorm = 'sync' needs CUDA devices (SyncBatchNorm has no CPU "
                          "implementation); use 'batch' or 'frozen'")
    amp_dtype = resolve_amp(tc["amp"], device)
    torch.manual_seed(tc["seed"])
    np.random.seed(tc["seed"] % 2**32)

    method = build_method(cfg)
    state = None
    if resume:
        state = load_checkpoint(resume)
        if state["method"]["name"] != method.name or state["method"]["options"] != cfg["method"]:
            raise ConfigError(f"checkpoint {resume} was trained with method "
                              f"{state['method']['name']!r} and other [method] options; resume it "
                              "with its own configuration (omit --config)")
    try:
        model = method.build_model()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad [method] options for method {method.name!r}: {e}") from None
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(device)
    if tc["batchnorm"] == "sync" and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # ---- data
    if not _has_source(dc["train"]):
        raise ConfigError("no training data: set data.train (a JSON list or a Tp/Gt folder)")
    train_set = build_dataset(dc["train"], dc, train=True)
    val_set = build_dataset(dc["val"], dc, train=False) if _has_source(dc["val"]) else None
    test_set = build_dataset(dc["test"], dc, train=False) if _has_source(dc["test"]) else None
    bs = tc["batch_size"]
    sampler = _EpochSampler(train_set, info.rank, info.world_size, tc["seed"])
    workers = 0 if isinstance(train_set, InMemoryDataset) else dc["num_workers"]
    loader = DataLoader(train_set, batch_size=bs, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    per_epoch = len(train_set) // info.world_size // bs
    if per_epoch == 0:
        raise ConfigError(f"the training set has {len(train_set)} images, fewer than "
                          f"train.batch_size ({bs}) x processes ({info.world_size})")

    # ---- plan
    stages = tuple(method.stages)
    fractions = [f for _, f in stages]
    budget = float(tc["time_budget_s"])
    cap_total = tc["steps"] if tc["steps"] > 0 else tc["epochs"] * per_epoch
    if cap_total > 0:
        stage_caps = plan_stages(fractions, cap_total)
    else:  # time budget only
        stage_caps = [10**12] * len(stages)
    stage_budgets = [budget * f / sum(fractions) for f in fractions] if budget > 0 else None

    prog = dict(step=0, stage=0, stage_step=0, stage_total=None, epoch=0, batch_in_epoch=0,
                elapsed_s=0.0, stage_elapsed_s=0.0)
    if state is not None:
        prog.update(state.get("progress") or {})
        if state.get("rng"):
            torch.set_rng_state(state["rng"]["torch"])
            if torch.cuda.is_available() and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    batches = _Batches(loader, sampler, per_epoch, prog["epoch"], prog["batch_in_epoch"])

    log_path = os.path.join(out_dir, "train_log.jsonl") if main else None
    if main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.toml"), "w", encoding="utf-8") as f:
            f.write(config_to_toml(cfg))
        if state is None and os.path.exists(log_path):
            os.remove(log_path)
    jlog = JsonlLog(log_path)
    say(f"fastiml: method {method.name} ({', '.join(n for n, _ in stages)}), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(train_set)} training images, batch {bs} x {info.world_size} process(es), "
        f"device {device}, amp {amp_dtype or 'off'}"
        + (f", time budget {format_duration(budget)}" if budget > 0 else f", {cap_total} steps")
        + (f"; resuming at step {prog['step']}" if state is not None else ""))

    ckpt_common = dict(method_name=method.name, method_options=copy.deepcopy(cfg["method"]),
                       config=cfg)
    step = prog["step"]
    elapsed_before = prog["elapsed_s"]
    t_run = _clock()
    run = {"wall": 0.0, "data": 0.0, "images": 0, "steps": 0, "loss": math.nan}
    metrics: Dict[str, Dict] = {}

    def elapsed() -> float:
        return elapsed_before + _clock() - t_run

    for si in range(prog["stage"], len(stages)):
        stage_name = stages[si][0]
        resumed_here = state is not None and si == prog["stage"]
        stage_step = prog["stage_step"] if resumed_here else 0
        stage_elapsed_before = prog["stage_elapsed_s"] if resumed_here else 0.0
        cap = stage_caps[si]
        if stage_budgets is not None and resumed_here and prog.get("stage_total"):
            stage_total = int(prog["stage_total"])  # re-fitted below as the time is measured
        elif cap < 10**12:
            stage_total = cap
        else:
            stage_total = 1000  # placeholder until the speed is measured
        if stage_step >= stage_total:
            continue

        params = method.start_stage(model, si)
        params = [p for p in params if p.requires_grad]
        if not params:
            raise RuntimeError(f"method {method.name!r} returned no trainable parameters for "
                               f"stage {stage_name!r}")
        _set_train_mode(model, tc["batchnorm"])
        net = model
        if info.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=tc["find_unused_parameters"])
        optimizer = torch.optim.AdamW(_param_groups(params, tc["weight_decay"]), lr=tc["lr"])
        scheduler = WarmupCosine(optimizer, stage_total, tc["warmup_steps"], tc["min_lr_ratio"])
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        if resumed_here and state.get("optimizer") is not None and stage_step > 0:
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
                scheduler.set_total(stage_total)
            if state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])

        def checkpoint(path: str) -> None:
            if main:
                save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, progress=dict(
                                    step=step, stage=si, stage_step=stage_step,
                                    stage_total=stage_total, epoch=batches.epoch,
                                    batch_in_epoch=batches.batch_in_epoch, elapsed_s=elapsed(),
                                    stage_elapsed_s=stage_elapsed_before + _clock()
                                    - t_stage),
                                **ckpt_common)
            D.barrier()

        window = Window()
        t_stage = _clock()
        t_prev = t_stage
        measure_from = None  # (time, stage_step) once the first step of this stage is done
        while stage_step < stage_total:
            batch = batches.next()
            t_data = _clock() - t_prev
            batch = _to_device(batch, device)
            batch["image"] = input_filter(batch["image"], dc["input_filter"])
            with autocast(device, amp_dtype):
                loss, parts = method.training_loss(net, batch, si)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            stage_step += 1
            now = _clock()
            n_img = batch["image"].shape[0] * info.world_size
            window.add(_number(loss), {k: _number(v) for k, v in parts.items()}, n_img,
                       now - t_prev, t_data)
            run["wall"] += now - t_prev
            run["data"] += t_data
            run["images"] += n_img
            run["steps"] += 1

            # -- time budget: re-fit this stage's length to the time left (all ranks agree)
            if stage_budgets is not None:
                left = stage_budgets[si] - (stage_elapsed_before + now - t_stage)
                if measure_from is None:
                    measure_from = (now, stage_step)
                    proposal = stage_total if left > 0 else stage_step
                elif stage_step - measure_from[1] >= 2:
                    per_step = (now - measure_from[0]) / (stage_step - measure_from[1])
                    proposal = stage_step + max(0, int(left / per_step))
                else:
                    proposal = stage_total if left > 0 else stage_step
                proposal = int(D.all_reduce_min(float(min(proposal, cap)), device))
                if proposal != stage_total:
                    stage_total = max(stage_step, proposal)
                    scheduler.set_total(stage_total)

            # -- progress, log, checkpoint, validation
            avg_step = run["wall"] / max(run["steps"], 1)
            if stage_budgets is not None:
                eta = (max(0.0, stage_budgets[si] - (stage_elapsed_before + now - t_stage))
                       + sum(stage_budgets[si + 1:]))
            else:
                eta = avg_step * ((stage_total - stage_step) + sum(stage_caps[si + 1:]))
            current = window.summary()
            progress.update(step, step + (stage_total - stage_step) + (
                sum(stage_caps[si + 1:]) if stage_budgets is None else 0),
                stage=stage_name if len(stages) > 1 else "", loss=current["loss"],
                imgs_per_s=current["imgs_per_s"], data_wait=current["data_wait_fraction"],
                eta_s=eta, lr=lr, force=stage_step >= stage_total)
            if (tc["log_every"] > 0 and step % tc["log_every"] == 0) or stage_step >= stage_total:
                if info.distributed:  # the logged loss is the mean over ranks
                    current = _mean_over_ranks(current, device)
                run["loss"] = current["loss"]
                if not math.isfinite(current["loss"]):
                    say(f"fastiml: warning: non-finite loss at step {step}")
                jlog.write({"step": step, "stage": stage_name, "stage_index": si,
                            "epoch": batches.epoch, "loss": current["loss"],
                            "parts": current["parts"], "lr": lr,
                            "imgs_per_s": current["imgs_per_s"],
                            "data_wait_fraction": current["data_wait_fraction"],
                            "elapsed_s": elapsed()})
                window.reset()
            if tc["ckpt_every"] > 0 and step % tc["ckpt_every"] == 0 and stage_step < stage_total:
                checkpoint(os.path.join(out_dir, "checkpoints", f"step_{step:07d}.pt"))
            if (tc["eval_every"] > 0 and step % tc["eval_every"] == 0 and val_set is not None
                    and stage_step < stage_total):
                m = _evaluate(model, method, val_set, tc, dc, device)
                jlog.write({"event": "eval", "split": "val", "step": step, "stage": stage_name, **m})
                say(f"val at step {step}: pixel_f1 {_fmt(m['pixel_f1'])} "
                    f"pixel_auc {_fmt(m['pixel_auc'])} image_auc {_fmt(m['image_auc'])}")
                _set_train_mode(model, tc["batchnorm"])
            t_prev = _clock()
        progress.close()
        if si < len(stages) - 1:
            checkpoint(os.path.join(out_dir, "checkpoints", f"step_{step:07d}.pt"))
        else:
            checkpoint(os.path.join(out_dir, "model.pt"))

    # ---- final evaluation
    train_s = elapsed()
    for split, ds in (("val", val_set), ("test", test_set)):
        if ds is not None:
            metrics[split] = _evaluate(model, method, ds, tc, dc, device)
            jlog.write({"event": "eval", "split": split, "step": step, **metrics[split]})
            say(f"{split}: pixel_f1 {_fmt(metrics[split]['pixel_f1'])} "
                f"pixel_iou {_fmt(metrics[split]['pixel_iou'])} "
                f"pixel_auc {_fmt(metrics[split]['pixel_auc'])} "
                f"image_auc {_fmt(metrics[split]['image_auc'])}")
    if main and metrics:
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    D.barrier()
    return {
        "output_dir": out_dir,
        "checkpoint": os.path.join(out_dir, "model.pt"),
        "steps": step,
        "train_s": train_s,
        "elapsed_s": _clock() - t_begin,
        "data_wait_fraction": run["data"] / max(run["wall"], 1e-12),
        "imgs_per_s": run["images"] / max(run["wall"], 1e-12),
        "final_loss": run["loss"],
        "metrics": metrics,
    }


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _evaluate(model, method, dataset, tc, dc, device) -> Dict:
    return evaluate(model, method, dataset, batch_size=tc["eval_batch_size"] or tc["batch_size"],
                    device=device, amp=tc["amp"], num_workers=min(dc["num_workers"], 2),
                    input_filter_kind=dc["input_filter"])


def _mean_over_ranks(summary: Dict, device: torch.device) -> Dict:
    """``summary`` with its loss and parts averaged over ranks (one all-reduce)."""
    keys = sorted(summary["parts"])
    values = [summary["loss"]] + [summary["parts"][k] for k in keys]
    t = torch.tensor(values, dtype=torch.float64,
                     device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    out = dict(summary)
    out["loss"] = float(t[0])
    out["parts"] = {k: float(v) for k, v in zip(keys, t[1:].tolist())}
    return out
