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
last), ``checkpoints/last.pt`` (every ``train.ckpt_minutes`` and on SIGINT / SIGTERM),
``model.pt`` (the final checkpoint: resumable, and what ``eval`` / ``predict`` load),
``metrics.json`` (``{"val": ..., "test": ...}`` for the sources given).

Safety (see :func:`train`): a step whose loss or gradient is NaN / inf is skipped (no update) and
counted in the log; ``train.max_nonfinite_steps`` such steps in a row stop the run, and so does an
update that multiplies the weights' norm by more than ``_MAX_NORM_GROWTH``; a checkpoint is never
written with non-finite or exploded weights; SIGINT / SIGTERM end the run after the current step
with a resumable checkpoint (a signal ignored when the run starts stays ignored).

Exact resume: every random draw of a step is a pure function of ``train.seed`` and the position,
never of the draws before it: the data order of (seed, epoch), each item's augmentation of
(seed, epoch, item) -- whichever loader worker reads it --, the step's own draws (dropout, pixel
sampling) of (seed, rank, step). A run resumed from a checkpoint written at any step, inside an
epoch or at its end, therefore takes the same steps as the uninterrupted run: on the CPU its
weights are bit-equal (on CUDA, as far as the kernels are deterministic).

The loop reads top to bottom in :class:`_Run`: set-up (``__init__``), the stage loop (:meth:`run`,
:meth:`_train_stage`), one step (:meth:`_train_step`, :meth:`_update`), logging
(:meth:`_report`), checkpointing (:meth:`_periodic_work`, :meth:`_checkpoint`,
:meth:`_interrupt`), final evaluation (:meth:`_finish`).

The engine never looks at the method's name: everything method-specific is behind the method's
``stages``, ``build_model``, ``start_stage``, ``training_loss`` and ``predict``.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
from fastiml.engine.evaluate import (copy_move_from_config, evaluate, image_score_from_config,
                                     input_filter)
from fastiml.engine.guards import (GlobalState, StopSignals, TrainingDiverged, TrainingInterrupted,
                                   ignore_interrupts_in_worker, non_finite_weights,
                                   remove_stale_temp_files, skipped_files)
from fastiml.engine.precision import autocast, resolve_amp
from fastiml.engine.pretrain import load_init
from fastiml.engine.progress import JsonlLog, Progress, Window, format_duration, json_safe

#: The loop's clock (tests replace it with a fake one to check time budgets deterministically).
_clock = time.perf_counter

#: An update that multiplies the weights' 2-norm by more than this in one step has exploded: the
#: run stops (TrainingDiverged) before it writes a checkpoint of those weights or takes another
#: step. Far above what a training step does: AdamW moves each weight by about the learning rate.
_MAX_NORM_GROWTH = 10.0

#: Stream tags of _derived_seed: an item's augmentation, a step's own draws.
_ITEM_DRAWS, _STEP_DRAWS = 0, 1

__all__ = ["train", "WarmupCosine", "InMemoryDataset", "build_dataset", "build_method",
           "plan_stages", "TrainingInterrupted", "TrainingDiverged"]


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
        self.skipped = list(getattr(source, "skipped", []))  # pairs the source could not read

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


def build_dataset(source, data_cfg: Dict, train: bool, copy_move: str = "off") -> Dataset:
    """The training (``train=True``: augmentation / preload as configured) or evaluation data set
    of ``source`` under the config's ``[data]`` table; ``copy_move`` (evaluation sets only) as
    :class:`ForgeryDataset`'s, e.g. ``copy_move_from_config(cfg["eval"])``."""
    size, mode = data_cfg["size"], data_cfg["mode"]
    on_error = data_cfg.get("on_error", "warn")
    if not train:
        return ForgeryDataset(source, size=size, mode=mode, on_error=on_error, copy_move=copy_move)
    if copy_move != "off":
        raise ValueError(f"copy_move is for evaluation sets (train=False), got {copy_move!r}")
    if data_cfg["preload"]:
        return InMemoryDataset(ForgeryDataset(source, size=size, mode=mode, on_error=on_error),
                               augment=data_cfg["augment"])
    return ForgeryDataset(source, size=size, mode=mode, on_error=on_error,
                          augment=Augment() if data_cfg["augment"] else None)


def _derived_seed(seed: int, *key: int) -> int:
    """The seed of the random draws named by ``key`` (a stream tag, then the position: epoch, or
    rank and step): a function of ``train.seed`` and the position alone, so that a resumed
    run draws there what the uninterrupted run drew, whatever was drawn before."""
    state = np.random.SeedSequence(seed % 2**64, spawn_key=key).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class _EpochSampler(Sampler):
    """DistributedSampler (shuffled per (seed, epoch), ``drop_last``) that can skip the items a
    resumed run already consumed in its first epoch. Yields ``(index, item seed)`` for
    :class:`_SeededItems`."""

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.seed, self.epoch, self.skip = seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        # One vectorised draw per epoch: each item's seed is a function of (seed, epoch, item).
        seeds = np.random.default_rng(_derived_seed(self.seed, _ITEM_DRAWS, self.epoch)).integers(
            0, 2**63 - 1, size=len(self.inner.dataset), dtype=np.int64).tolist()
        for i in itertools.islice(self.inner, self.skip, None):
            yield i, seeds[i]

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


class _SeededItems(Dataset):
    """``dataset[index]`` for a key ``(index, seed)``, read with torch's CPU generator seeded by
    ``seed`` and put back after: the data sets draw their augmentation from it, so an item's
    augmentation depends on its seed only, not on which loader worker reads it after what."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Dict:
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


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


def _param_groups(params: Sequence[nn.Parameter], weight_decay: float, lr: float,
                  backbone: Sequence[nn.Parameter] = (), backbone_lr_mult: float = 1.0) -> List[Dict]:
    """AdamW groups: no decay on biases and normalisation weights; ``backbone`` at
    ``lr * backbone_lr_mult``."""
    slow = {id(p) for p in backbone} if backbone_lr_mult != 1.0 else set()
    groups = []
    for scaled in (False, True):
        for decayed in (True, False):
            ps = [p for p in params if (p.ndim > 1) == decayed and (id(p) in slow) == scaled]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decayed else 0.0,
                               "lr": lr * (backbone_lr_mult if scaled else 1.0)})
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
        resume: a checkpoint written by a previous run of the same method, at any step: model,
            optimizer, schedule and position (stage, step, epoch, batch) are restored and
            training continues from the step after it, drawing what the uninterrupted run drew
            (see "Exact resume" in the module docstring).
        log: where one-line messages go (default: stderr on rank 0).

    Returns (on every rank) a dict: ``output_dir``, ``checkpoint`` (model.pt), ``steps``,
    ``skipped_steps``, ``elapsed_s``, ``train_s``, ``data_wait_fraction``, ``imgs_per_s``,
    ``final_loss``, ``metrics`` (``{"val": ..., "test": ...}``).

    Raises:
        TrainingInterrupted: on SIGINT / SIGTERM, after the current step, once a resumable
            checkpoint (``checkpoints/last.pt``) is written; its message says how to resume.
            A signal ignored when train() starts stays ignored (a shell starts background jobs,
            ``cmd &`` or ``nohup cmd &``, with SIGINT ignored): such a run stops on the other
            one (``kill <pid>`` sends SIGTERM). The handlers in place before are put back.
        TrainingDiverged: ``train.max_nonfinite_steps`` consecutive steps had a non-finite loss
            or gradient (each was skipped: no update), or an update left the weights non-finite
            or multiplied their norm by more than ``_MAX_NORM_GROWTH``; no checkpoint is written
            of such weights, and the message names the last checkpoint written after a step
            with a finite loss and a sane update (a resumed-from checkpoint counts), or none.

    The thread count (``train.threads``) and the torch / NumPy RNGs (seeded by ``train.seed``) are
    put back as they were when it returns or raises.
    """
    saved = GlobalState()
    info = D.init_from_env(cfg["train"]["device"])
    try:
        with StopSignals() as signals:
            return _Run(cfg, info, resume, log, signals).run()
    finally:
        D.teardown(info)
        saved.restore()


@dataclass
class _Stage:
    """The stage being trained: its position, schedule and optimiser."""
    index: int
    name: str
    step: int  # steps done in this stage
    total: int  # steps planned for it (re-fitted under a time budget)
    elapsed_before: float  # seconds spent in it before this process started (resume)
    params: List[nn.Parameter]
    net: nn.Module  # the model, DDP-wrapped under torch.distributed
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    scaler: torch.amp.GradScaler
    t_start: float = 0.0
    measure_from: Optional[Tuple[float, int]] = None  # (time, step) after its first step

    def elapsed(self) -> float:
        return self.elapsed_before + _clock() - self.t_start


class _Run:
    """One call of :func:`train`: ``__init__`` sets everything up, :meth:`run` trains the stages
    one after the other, then evaluates."""

    # ------------------------------------------------------------------------------ set-up
    def __init__(self, cfg: Dict, info: D.DistInfo, resume: Optional[str],
                 log: Optional[Callable[[str], None]], signals: StopSignals):
        self.t_begin = _clock()
        self.cfg, self.tc, self.dc = cfg, cfg["train"], cfg["data"]
        self.info, self.device, self.main = info, info.device, info.is_main
        self.log_fn, self.signals = log, signals
        self.out_dir = cfg["output"]["dir"]
        tc = self.tc
        self.progress = Progress(enabled=self.main and tc["progress"], every=max(1, tc["log_every"]))
        if tc["threads"] > 0:
            torch.set_num_threads(tc["threads"])
        if tc["batchnorm"] == "sync" and info.distributed and self.device.type != "cuda":
            raise ConfigError("train.batchnorm = 'sync' needs CUDA devices (SyncBatchNorm has no "
                              "CPU implementation); use 'batch' or 'frozen'")
        self.amp_dtype = resolve_amp(tc["amp"], self.device)
        torch.manual_seed(tc["seed"])
        np.random.seed(tc["seed"] % 2**32)

        self.method = build_method(cfg)
        self.state = self._read_resume(resume)
        self.model = self._build_model()
        self._build_data()
        self._plan()
        self._open_outputs()

        self.step = self.prog["step"]
        self.elapsed_before = self.prog["elapsed_s"]
        self.t_run = _clock()
        self.t_last_checkpoint = self.t_run
        self.last_checkpoint: Optional[str] = resume
        # The last checkpoint written after a step whose loss was finite and whose update was
        # applied and sane: the one a diverged run names (a resumed-from checkpoint counts).
        self.last_sound_checkpoint: Optional[str] = resume
        self.step_updated = False  # whether the last step's update was applied
        self.weights = [p for p in self.model.parameters() if p.is_floating_point()]
        self.update_from: Optional[Tuple[int, float]] = None  # (step, weights' norm before it)
        self.totals = {"wall": 0.0, "data": 0.0, "images": 0, "steps": 0, "loss": math.nan}
        self.nonfinite_run = 0  # consecutive skipped steps
        self.skipped_steps = 0
        self.stop_signal = 0  # the signal all ranks agreed to stop on
        self.checkpoint_due = False  # train.ckpt_minutes have passed (all ranks agree)

    def say(self, text: str) -> None:
        if self.log_fn is not None:
            self.log_fn(text)
        elif self.main:
            self.progress.close()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def _read_resume(self, resume: Optional[str]) -> Optional[Dict]:
        if not resume:
            return None
        state = load_checkpoint(resume)
        if (state["method"]["name"] != self.method.name
                or state["method"]["options"] != self.cfg["method"]):
            raise ConfigError(f"checkpoint {resume} was trained with method "
                              f"{state['method']['name']!r} and other [method] options; resume it "
                              "with its own configuration (omit --config)")
        saved = state.get("config", {}).get("train", {}).get("backbone_lr_mult", 1.0)
        if saved != self.tc["backbone_lr_mult"]:  # the optimiser's state is kept per group
            raise ConfigError(f"checkpoint {resume} was trained with train.backbone_lr_mult = "
                              f"{saved}, not {self.tc['backbone_lr_mult']}; resume it with its own "
                              "value")
        return state

    def _build_model(self) -> nn.Module:
        try:
            model = self.method.build_model()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad [method] options for method {self.method.name!r}: {e}") from None
        if self.state is not None:
            model.load_state_dict(self.state["model"])
        elif self.tc["init"]:
            try:
                self.say(load_init(model, self.tc["init"], self.method.model_options,
                                   self.dc["input_filter"]))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        model.to(self.device)
        if self.tc["batchnorm"] == "sync" and self.info.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _build_data(self) -> None:
        dc, tc, info = self.dc, self.tc, self.info
        if not _has_source(dc["train"]):
            raise ConfigError("no training data: set data.train (a JSON list or a Tp/Gt folder)")
        self.train_set = build_dataset(dc["train"], dc, train=True)
        # Validation (every train.eval_every steps) watches the network alone: copy-move matching
        # does not change as it trains, and would be recomputed on every image each time. Test
        # is scored once, as `fastiml eval` scores the checkpoint (eval.copy_move).
        self.val_set = build_dataset(dc["val"], dc, train=False) if _has_source(dc["val"]) else None
        self.test_set = (build_dataset(dc["test"], dc, train=False,
                                       copy_move=copy_move_from_config(self.cfg["eval"]))
                         if _has_source(dc["test"]) else None)
        bs = tc["batch_size"]
        self.sampler = _EpochSampler(self.train_set, info.rank, info.world_size, tc["seed"])
        workers = 0 if isinstance(self.train_set, InMemoryDataset) else dc["num_workers"]
        self.loader = DataLoader(_SeededItems(self.train_set), batch_size=bs,
                                 sampler=self.sampler, num_workers=workers, drop_last=True,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0,
                                 worker_init_fn=ignore_interrupts_in_worker if workers else None)
        self.per_epoch = len(self.train_set) // info.world_size // bs
        if self.per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.train_set)} images, fewer than "
                              f"train.batch_size ({bs}) x processes ({info.world_size})")

    def _plan(self) -> None:
        """Steps (or seconds) per stage, and where to start (0, or the resumed position)."""
        tc = self.tc
        self.stages = tuple(self.method.stages)
        fractions = [f for _, f in self.stages]
        budget = float(tc["time_budget_s"])
        self.cap_total = tc["steps"] if tc["steps"] > 0 else tc["epochs"] * self.per_epoch
        if self.cap_total > 0:
            self.stage_caps = plan_stages(fractions, self.cap_total)
        else:  # time budget only
            self.stage_caps = [10**12] * len(self.stages)
        self.stage_budgets = ([budget * f / sum(fractions) for f in fractions] if budget > 0
                              else None)
        self.prog = dict(step=0, stage=0, stage_step=0, stage_total=None, epoch=0,
                         batch_in_epoch=0, elapsed_s=0.0, stage_elapsed_s=0.0)
        if self.state is not None:
            self.prog.update(self.state.get("progress") or {})
        self.batches = _Batches(self.loader, self.sampler, self.per_epoch, self.prog["epoch"],
                                self.prog["batch_in_epoch"])

    def _open_outputs(self) -> None:
        out_dir, main = self.out_dir, self.main
        log_path = os.path.join(out_dir, "train_log.jsonl") if main else None
        if main:
            os.makedirs(out_dir, exist_ok=True)
            remove_stale_temp_files(out_dir, os.path.join(out_dir, "checkpoints"))
            with open(os.path.join(out_dir, "config.toml"), "w", encoding="utf-8") as f:
                f.write(config_to_toml(self.cfg))
            if self.state is None and os.path.exists(log_path):
                os.remove(log_path)
        self.jlog = JsonlLog(log_path)
        self.window = Window()
        budget = float(self.tc["time_budget_s"])
        self.say(f"fastiml: method {self.method.name} "
                 f"({', '.join(n for n, _ in self.stages)}), "
                 f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, "
                 f"{len(self.train_set)} training images, batch {self.tc['batch_size']} x "
                 f"{self.info.world_size} process(es), device {self.device}, "
                 f"amp {self.amp_dtype or 'off'}"
                 + (f", time budget {format_duration(budget)}" if budget > 0
                    else f", {self.cap_total} steps")
                 + (f"; resuming at step {self.prog['step']}" if self.state is not None else ""))
        for split, ds in (("train", self.train_set), ("val", self.val_set),
                          ("test", self.test_set)):
            files = skipped_files(ds)
            if files:
                self.jlog.write({"event": "skipped_files", "split": split, "files": files})
                self.say(f"fastiml: warning: {len(files)} {split} file(s) skipped as unreadable "
                         f"(data.on_error = 'warn'; listed in train_log.jsonl), first: "
                         f"{files[0]['file']}")

    # ---------------------------------------------------------------------------- the run
    def run(self) -> Dict:
        for si in range(self.prog["stage"], len(self.stages)):
            stage = self._start_stage(si)
            if stage is None:  # finished before the checkpoint this run resumed from
                continue
            self._train_stage(stage)
        return self._finish()

    def _start_stage(self, si: int) -> Optional[_Stage]:
        """Fresh AdamW, schedule and scaler for stage ``si`` (restored when resuming inside it)."""
        tc, state, prog = self.tc, self.state, self.prog
        resumed_here = state is not None and si == prog["stage"]
        step = prog["stage_step"] if resumed_here else 0
        cap = self.stage_caps[si]
        if self.stage_budgets is not None and resumed_here and prog.get("stage_total"):
            total = int(prog["stage_total"])  # re-fitted as the time is measured
        elif cap < 10**12:
            total = cap
        else:
            total = 1000  # placeholder until the speed is measured
        if step >= total:
            return None
        name = self.stages[si][0]
        params = [p for p in self.method.start_stage(self.model, si) if p.requires_grad]
        if not params:
            raise RuntimeError(f"method {self.method.name!r} returned no trainable parameters for "
                               f"stage {name!r}")
        _set_train_mode(self.model, tc["batchnorm"])
        net = self.model
        if self.info.distributed:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=tc["find_unused_parameters"])
        backbone = getattr(self.model, "backbone", None)
        optimizer = torch.optim.AdamW(
            _param_groups(params, tc["weight_decay"], tc["lr"],
                          () if backbone is None else list(backbone.parameters()),
                          tc["backbone_lr_mult"]), lr=tc["lr"])
        scheduler = WarmupCosine(optimizer, total, tc["warmup_steps"], tc["min_lr_ratio"])
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if resumed_here and state.get("optimizer") is not None and step > 0:
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
                scheduler.set_total(total)
            if state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
        return _Stage(si, name, step, total,
                      prog["stage_elapsed_s"] if resumed_here else 0.0, params, net, optimizer,
                      scheduler, scaler)

    def _train_stage(self, st: _Stage) -> None:
        self.window.reset()
        st.t_start = self.t_prev = _clock()
        while st.step < st.total:
            if self.stop_signal or (not self.info.distributed and self.signals.received):
                self._interrupt(st)
            lr, now = self._train_step(st)
            self._fit_to_time_budget(st, now)
            self._report(st, lr, now)
            self._periodic_work(st)
            self.t_prev = _clock()
        self.progress.close()
        last = st.index == len(self.stages) - 1
        self._checkpoint(st, os.path.join(self.out_dir, "model.pt") if last else
                         self._step_checkpoint_path())

    # ------------------------------------------------------------------------- one step
    def _train_step(self, st: _Stage) -> Tuple[float, float]:
        """Forward, backward and (unless a value is non-finite) the optimiser update of one
        batch; returns the step's learning rate and the time it ended."""
        batch = self.batches.next()
        t_data = _clock() - self.t_prev
        # The step's own draws (dropout, pixel sampling): from its position, not from the stream
        # that set-up and data loading went through, so that a resumed run draws the same.
        torch.manual_seed(_derived_seed(self.tc["seed"], _STEP_DRAWS, self.info.rank, self.step))
        batch = _to_device(batch, self.device)
        batch["image"] = input_filter(batch["image"], self.dc["input_filter"])
        # BatchNorm's running statistics change in the forward pass: kept to undo a skipped step
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        saved_buffers = [b.clone() for b in buffers]
        with autocast(self.device, self.amp_dtype):
            loss, parts = self.method.training_loss(st.net, batch, st.index)
        st.optimizer.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        updated = self.step_updated = self._update(st, loss)
        if not updated:
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
        lr = st.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a skipped step still counts: the schedule goes on
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            st.scheduler.step()
        self.step += 1
        st.step += 1
        self._count_skips(updated, lr)

        now = _clock()
        n_img = batch["image"].shape[0] * self.info.world_size
        self.window.add(_number(loss), {k: _number(v) for k, v in parts.items()}, n_img,
                        now - self.t_prev, t_data, skipped=not updated)
        self.totals["wall"] += now - self.t_prev
        self.totals["data"] += t_data
        self.totals["images"] += n_img
        self.totals["steps"] += 1
        return lr, now

    def _update(self, st: _Stage, loss: torch.Tensor) -> bool:
        """Clip and apply the gradients unless the loss or a gradient is NaN / inf; returns
        whether the weights were updated. TrainingDiverged first if the previous update blew the
        weights up (:meth:`_check_last_update`). With fp16 the GradScaler makes that call (it skips such
        steps and lowers its scale). All ranks agree, in the same all-reduce that shares a stop
        signal and a due time-based checkpoint."""
        clip = self.tc["grad_clip"]
        weight_norm = self._weight_norm()
        if st.scaler.is_enabled():
            weight_norm = float(weight_norm)
            self._check_last_update(weight_norm)
            if clip > 0:
                st.scaler.unscale_(st.optimizer)
                torch.nn.utils.clip_grad_norm_(st.params, clip)
            scale = st.scaler.get_scale()
            st.scaler.step(st.optimizer)
            st.scaler.update()
            finite = st.scaler.get_scale() >= scale
        else:
            grads = [p.grad for p in st.params if p.grad is not None]
            if clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(st.params, clip)
            else:
                norm = torch.nn.utils.get_total_norm(grads)
            finite = bool(torch.isfinite(norm)) and math.isfinite(_number(loss))
            weight_norm = float(weight_norm)  # read after that sync: no wait of its own
            self._check_last_update(weight_norm)
        due = (self.tc["ckpt_minutes"] > 0  # measured at the step's start: no extra clock reading
               and self.t_prev - self.t_last_checkpoint >= 60.0 * self.tc["ckpt_minutes"])
        skip, stop, due = D.any_over_ranks([not finite, self.signals.received, due], self.device)
        self.stop_signal, self.checkpoint_due = int(stop), bool(due)
        if skip:
            return False
        if not st.scaler.is_enabled():
            st.optimizer.step()
        self.update_from = (self.step + 1, weight_norm)
        return True

    @torch.no_grad()
    def _weight_norm(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The 2-norm of all the model's weights (one fused pass), accumulated in ``dtype``."""
        return torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(self.weights, 2, dtype=dtype)))

    def _check_last_update(self, norm: float) -> None:
        """TrainingDiverged when the last applied update left the weights' norm at ``norm``: not
        finite, or more than _MAX_NORM_GROWTH times what it was before it. Called before the
        next update and before a checkpoint: exploded weights are never updated again or saved."""
        if self.update_from is None:
            return
        step, before = self.update_from
        if norm <= _MAX_NORM_GROWTH * before:  # False for NaN
            return
        if norm == math.inf:  # finite weights of 1e30 overflow float32: say how large they are
            norm = float(self._weight_norm(torch.float64))
        what = (f"took the weights' 2-norm from {before:.3g} to {norm:.3g} (more than "
                f"x{_MAX_NORM_GROWTH:g} in one step)" if math.isfinite(norm) else
                "made a weight NaN / inf")
        self.jlog.write({"event": "diverged", "step": self.step, "exploding_update": step})
        raise TrainingDiverged(
            f"training diverged: the update of step {step} {what}; lower train.lr (now "
            f"{self.tc['lr']:g} at its peak) or raise train.warmup_steps. "
            f"{self._sound_checkpoint_note()}")

    def _sound_checkpoint_note(self) -> str:
        return ("Last checkpoint with a finite loss and a sane update: "
                f"{self.last_sound_checkpoint or 'none'}")

    def _count_skips(self, updated: bool, lr: float) -> None:
        if updated:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.skipped_steps += 1
        limit = self.tc["max_nonfinite_steps"]
        if self.nonfinite_run == 1:
            self.say(f"fastiml: warning: non-finite loss or gradient at step {self.step}: step "
                     f"skipped (no update); training stops after {limit} in a row "
                     "(train.max_nonfinite_steps)" if limit else
                     f"fastiml: warning: non-finite loss or gradient at step {self.step}: step "
                     "skipped (no update)")
        if limit and self.nonfinite_run >= limit:
            first = self.step - self.nonfinite_run + 1
            self.jlog.write({"event": "diverged", "step": self.step,
                             "skipped_steps": self.skipped_steps})
            raise TrainingDiverged(
                f"training diverged: the loss or a gradient was NaN / inf in {self.nonfinite_run} "
                f"consecutive steps ({first}-{self.step}; none was applied); lower train.lr "
                f"(now {self.tc['lr']:g} at its peak, {lr:.3g} at step {self.step}), check the "
                f"data, or raise train.max_nonfinite_steps. {self._sound_checkpoint_note()}")

    def _fit_to_time_budget(self, st: _Stage, now: float) -> None:
        """Under a time budget: re-fit this stage's length to the time left (ranks agree)."""
        if self.stage_budgets is None:
            return
        left = self.stage_budgets[st.index] - (st.elapsed_before + now - st.t_start)
        if st.measure_from is None:
            st.measure_from = (now, st.step)
            proposal = st.total if left > 0 else st.step
        elif st.step - st.measure_from[1] >= 2:
            per_step = (now - st.measure_from[0]) / (st.step - st.measure_from[1])
            proposal = st.step + max(0, int(left / per_step))
        else:
            proposal = st.total if left > 0 else st.step
        proposal = int(D.all_reduce_min(float(min(proposal, self.stage_caps[st.index])),
                                        self.device))
        if proposal != st.total:
            st.total = max(st.step, proposal)
            st.scheduler.set_total(st.total)

    # -------------------------------------------------------------------------- logging
    def _report(self, st: _Stage, lr: float, now: float) -> None:
        """The progress line, and every train.log_every steps a train_log.jsonl record."""
        tc, si = self.tc, st.index
        stage_done = st.step >= st.total
        later_caps = sum(self.stage_caps[si + 1:])
        if self.stage_budgets is not None:
            eta = (max(0.0, self.stage_budgets[si] - (st.elapsed_before + now - st.t_start))
                   + sum(self.stage_budgets[si + 1:]))
            total = self.step + (st.total - st.step)
        else:
            avg_step = self.totals["wall"] / max(self.totals["steps"], 1)
            eta = avg_step * ((st.total - st.step) + later_caps)
            total = self.step + (st.total - st.step) + later_caps
        current = self.window.summary()
        self.progress.update(self.step, total, stage=st.name if len(self.stages) > 1 else "",
                             loss=current["loss"], imgs_per_s=current["imgs_per_s"],
                             data_wait=current["data_wait_fraction"], eta_s=eta, lr=lr,
                             force=stage_done)
        if not ((tc["log_every"] > 0 and self.step % tc["log_every"] == 0) or stage_done):
            return
        if self.info.distributed:  # the logged loss is the mean over ranks
            current = _mean_over_ranks(current, self.device)
        self.totals["loss"] = current["loss"]
        self.jlog.write({"step": self.step, "stage": st.name, "stage_index": si,
                         "epoch": self.batches.epoch, "loss": current["loss"],
                         "parts": current["parts"], "lr": lr,
                         "imgs_per_s": current["imgs_per_s"],
                         "data_wait_fraction": current["data_wait_fraction"],
                         "skipped_steps": current["skipped_steps"],
                         "skipped_steps_total": self.skipped_steps,
                         "elapsed_s": self.elapsed()})
        self.window.reset()

    def elapsed(self) -> float:
        return self.elapsed_before + _clock() - self.t_run

    # -------------------------------------------------------------------- checkpointing
    def _periodic_work(self, st: _Stage) -> None:
        """Checkpoints every train.ckpt_every steps and every train.ckpt_minutes, validation
        every train.eval_every steps (none after a stage's last step: its end does them)."""
        tc = self.tc
        if st.step >= st.total:
            return
        if tc["ckpt_every"] > 0 and self.step % tc["ckpt_every"] == 0:
            self._checkpoint(st, self._step_checkpoint_path(), required=False)
        elif self.checkpoint_due:
            self._checkpoint(st, self._last_checkpoint_path(), required=False)
        if tc["eval_every"] > 0 and self.step % tc["eval_every"] == 0 and self.val_set is not None:
            m = _evaluate(self.model, self.method, self.val_set, self.cfg, self.device)
            self.jlog.write({"event": "eval", "split": "val", "step": self.step,
                             "stage": st.name, **m})
            self.say(f"val at step {self.step}: pixel_f1 {_fmt(m['pixel_f1'])} "
                     f"pixel_auc {_fmt(m['pixel_auc'])} image_auc {_fmt(m['image_auc'])}")
            _set_train_mode(self.model, tc["batchnorm"])

    def _step_checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoints", f"step_{self.step:07d}.pt")

    def _last_checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoints", "last.pt")

    def _checkpoint(self, st: _Stage, path: str, required: bool = True) -> Optional[str]:
        """A resumable checkpoint at ``path`` (rank 0 writes, all ranks wait). Weights with a NaN
        or an infinity are never written: TrainingDiverged when ``required``, else a warning;
        weights an update has just blown up (:meth:`_check_last_update`): TrainingDiverged."""
        bad = non_finite_weights(unwrap(self.model).state_dict())
        if bad:
            msg = (f"the weights are not finite ({len(bad)} tensors, e.g. {bad[0]}) at step "
                   f"{self.step}: checkpoint {path} not written; lower train.lr. "
                   f"{self._sound_checkpoint_note()}")
            if required:
                raise TrainingDiverged(f"training diverged: {msg}")
            self.say(f"fastiml: warning: {msg}")
            return None
        self._check_last_update(float(self._weight_norm()))
        if self.main:
            save_checkpoint(path, model=self.model, optimizer=st.optimizer,
                            scheduler=st.scheduler, scaler=st.scaler, progress=dict(
                                step=self.step, stage=st.index, stage_step=st.step,
                                stage_total=st.total, epoch=self.batches.epoch,
                                batch_in_epoch=self.batches.batch_in_epoch,
                                elapsed_s=self.elapsed(), stage_elapsed_s=st.elapsed()),
                            method_name=self.method.name,
                            method_options=copy.deepcopy(self.cfg["method"]), config=self.cfg)
        D.barrier()
        self.last_checkpoint = path
        if self.step_updated:
            self.last_sound_checkpoint = path
        self.t_last_checkpoint = _clock()
        return path

    def _interrupt(self, st: _Stage) -> None:
        """Save checkpoints/last.pt and raise TrainingInterrupted with the command to resume."""
        signum = self.stop_signal or self.signals.received or int(signal.SIGTERM)
        path = self._checkpoint(st, self._last_checkpoint_path())
        self.progress.close()
        name = signal.Signals(signum).name
        self.jlog.write({"event": "interrupted", "signal": name, "step": self.step,
                         "checkpoint": path})
        config = os.path.join(self.out_dir, "config.toml")
        raise TrainingInterrupted(
            f"interrupted by {name} at step {self.step}; resumable checkpoint {path}; resume "
            f"with: fastiml train --config {config} --resume {path}", signum, path)

    # ----------------------------------------------------------------- final evaluation
    def _finish(self) -> Dict:
        train_s = self.elapsed()
        metrics: Dict[str, Dict] = {}
        for split, ds in (("val", self.val_set), ("test", self.test_set)):
            if ds is None:
                continue
            if self.signals.received:
                raise TrainingInterrupted(
                    f"interrupted by {signal.Signals(self.signals.received).name} after training "
                    f"finished, before evaluating on data.{split}; the trained model is "
                    f"{self.last_checkpoint}", self.signals.received, self.last_checkpoint)
            m = _evaluate(self.model, self.method, ds, self.cfg, self.device)
            files = skipped_files(ds)
            if files:
                m["skipped"] = files
            metrics[split] = m
            self.jlog.write({"event": "eval", "split": split, "step": self.step, **m})
            self.say(f"{split}: pixel_f1 {_fmt(m['pixel_f1'])} pixel_iou {_fmt(m['pixel_iou'])} "
                     f"pixel_auc {_fmt(m['pixel_auc'])} image_auc {_fmt(m['image_auc'])}")
        if self.main and metrics:
            with open(os.path.join(self.out_dir, "metrics.json"), "w", encoding="utf-8") as f:
                json.dump(json_safe(metrics), f, indent=2, allow_nan=False)  # NaN -> null
        D.barrier()
        t = self.totals
        return {
            "output_dir": self.out_dir,
            "checkpoint": os.path.join(self.out_dir, "model.pt"),
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "train_s": train_s,
            "elapsed_s": _clock() - self.t_begin,
            "data_wait_fraction": t["data"] / max(t["wall"], 1e-12),
            "imgs_per_s": t["images"] / max(t["wall"], 1e-12),
            "final_loss": t["loss"],
            "metrics": metrics,
        }


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _evaluate(model, method, dataset, cfg, device) -> Dict:
    tc, dc = cfg["train"], cfg["data"]
    return evaluate(model, method, dataset, batch_size=tc["eval_batch_size"] or tc["batch_size"],
                    device=device, amp=tc["amp"], num_workers=min(dc["num_workers"], 2),
                    input_filter_kind=dc["input_filter"], **image_score_from_config(cfg["eval"]))


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
