"""Training configuration: a TOML file (stdlib ``tomllib``) over built-in defaults, plus overrides.

Sections and keys (every key is optional; the defaults are in :data:`DEFAULTS`)::

    [data]
    train = "path/to/list.json"    # a JSON list of [image, mask], a Tp/Gt(/Au) folder, or a list of those
    val = ""                        # optional; evaluated at the end (and every train.eval_every steps)
    test = ""                       # optional; evaluated at the end of training
    size = 512                      # images are brought to size x size ...
    mode = "resize"                 # ... by "resize" or by "pad" (padding excluded from metrics)
    augment = true                  # random flips / rotations / rescale / photometric (fastiml.data.Augment)
    preload = false                 # decode the training set once into memory (augment: flips and rot90 only)
    num_workers = 2                 # DataLoader worker processes (0 = load in the training process)
    input_filter = "none"           # "highpass": the network sees the noise residual (see engine.evaluate.input_filter)
    source_dir = ""                 # a folder of authentic photographs: `fastiml train` / `demo` forge
    source_n = 1000                 #   source_n images from it (photo-style edits, at data.size) and add them to data.train
    on_error = "warn"               # a bad image / mask pair: "warn" skips it (listed in the logs), "raise" stops

    [train]
    method = "ncl"                  # a name from fastiml.methods.available()
    epochs = 10                     # used when steps = 0
    steps = 0                       # total optimiser steps (over all stages) when > 0
    time_budget_s = 0.0             # > 0: stop after this many seconds, cosine schedule fitted to it
    batch_size = 8                  # per process
    lr = 1e-3
    weight_decay = 1e-4             # AdamW; not applied to biases and normalisation weights
    warmup_steps = 100              # linear warm-up at the start of every stage
    min_lr_ratio = 0.0              # the cosine ends at lr * min_lr_ratio
    backbone_lr_mult = 1.0          # the encoder (model.backbone) trains at lr * this: < 1 keeps more of the weights train.init loaded
    amp = "auto"                    # "bf16", "fp16" (GradScaler), "off"; "auto" = bf16 on a CUDA GPU that has it, else off
    seed = 0
    grad_clip = 1.0                 # max global gradient norm (0 = no clipping)
    log_every = 10                  # steps between log lines / train_log.jsonl records
    ckpt_every = 0                  # steps between checkpoints (0 = only at stage ends and the end)
    ckpt_minutes = 10.0             # minutes between resumable checkpoints/last.pt (0 = never)
    max_nonfinite_steps = 20        # stop after this many consecutive steps with a non-finite loss / gradient (0 = never)
    eval_every = 0                  # steps between validations on data.val (0 = only at the end)
    eval_batch_size = 0             # 0 = batch_size
    device = "auto"                 # "auto" (cuda:LOCAL_RANK when available, else cpu), "cpu", "cuda", "cuda:1"
    threads = 0                     # torch.set_num_threads (0 = leave torch's default)
    batchnorm = "batch"             # "batch", "frozen" (running statistics, affine still trained), "sync" (SyncBatchNorm under DDP, CUDA)
    find_unused_parameters = true   # DDP: allow parameters a method's loss does not use
    progress = true                 # progress bar on stderr
    init = ""                       # weights to start from: a file `fastiml pretrain-trace` wrote, or "camera-trace" (shipped)

    [method]                        # passed to fastiml.methods.build(train.method, **method)
    model = { encoder = "resnet18", base_width = 64 }   # the network's keyword arguments
    loss = { patch = 4 }            # the loss's; a key (or table) the method does not read is an error

    [eval]                          # how `fastiml eval` / `predict` (and the demo's report) see an image
    resolution = "native"           # "native": its own pixels (tiled when large); "train": resized as data.size / data.mode
    max_pixels = 1048576            # native: images up to this many pixels in one pass ...
    tile = 768                      # ... larger ones in tile x tile tiles
    overlap = 96                    # pixels shared by neighbouring tiles (blended; see engine.inference)
    image_score = "max"             # image score of image_auc / image_acc: max, topk, area, mean, weighted, contrast (fastiml.metrics.image_scores)
    image_topk = 0.01               # topk / contrast: the mean of this fraction of the map's highest pixels, in (0, 1]
    copy_move = "keypoints"         # "keypoints": copies found by matching the image with itself fused into the map (fastiml.copy_move); "off"

    [output]
    dir = "runs/fastiml"

    [demo]                          # read by `fastiml demo` only (n_train, n_test, synth); ignored by train

Relative paths are taken relative to the current directory. Overrides ``section.key=value`` (the
CLI's ``--set``) are typed by the default's type (``train.lr=3e-4`` is a float, ``data.augment=false``
a bool); keys whose default is not a scalar, and every key under ``[method]``, are parsed as TOML
values (``method.model.base_width=16``, ``data.train=["a.json","b"]``), falling back to a plain
string. An unknown section or key is a :class:`ConfigError` that names it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tomllib
from typing import Any, Dict, Iterable, Optional

from fastiml.copy_move import COPY_MOVE_MODES
from fastiml.metrics import DEFAULT_IMAGE_SCORE, DEFAULT_IMAGE_TOPK, IMAGE_SCORES

__all__ = ["DEFAULTS", "ConfigError", "load_config", "read_toml", "apply_override", "validate", "default_config",
           "config_to_toml"]

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "data": {
        "train": "",
        "val": "",
        "test": "",
        "size": 512,
        "mode": "resize",
        "augment": True,
        "preload": False,
        "num_workers": 2,
        "input_filter": "none",
        "source_dir": "",
        "source_n": 1000,
        "on_error": "warn",
    },
    "train": {
        "method": "ncl",
        "epochs": 10,
        "steps": 0,
        "time_budget_s": 0.0,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 100,
        "min_lr_ratio": 0.0,
        "backbone_lr_mult": 1.0,
        "amp": "auto",
        "seed": 0,
        "grad_clip": 1.0,
        "log_every": 10,
        "ckpt_every": 0,
        "ckpt_minutes": 10.0,
        "max_nonfinite_steps": 20,
        "eval_every": 0,
        "eval_batch_size": 0,
        "device": "auto",
        "threads": 0,
        "batchnorm": "batch",
        "find_unused_parameters": True,
        "progress": True,
        "init": "",
    },
    "method": {},
    "eval": {
        "resolution": "native",
        "max_pixels": 1024 * 1024,
        "tile": 768,
        "overlap": 96,
        "image_score": DEFAULT_IMAGE_SCORE,
        "image_topk": DEFAULT_IMAGE_TOPK,
        "copy_move": "keypoints",
    },
    "output": {
        "dir": "runs/fastiml",
    },
    "demo": {},
}
#: Free-form tables: [method] goes to methods.build; [demo] is read by `fastiml demo` only.
FREE_FORM = ("method", "demo")

#: Keys whose value may be a data source: a path string ("" = none) or a list of sources.
SOURCE_KEYS = ("train", "val", "test")
CHOICES = {
    ("data", "mode"): ("resize", "pad"),
    ("data", "input_filter"): ("none", "highpass"),
    ("data", "on_error"): ("warn", "raise"),
    ("train", "amp"): ("auto", "bf16", "fp16", "off"),
    ("train", "batchnorm"): ("batch", "frozen", "sync"),
    ("eval", "resolution"): ("native", "train"),
    ("eval", "image_score"): IMAGE_SCORES,
    ("eval", "copy_move"): COPY_MOVE_MODES,
}
POSITIVE = {("data", "size"), ("train", "batch_size"), ("eval", "max_pixels"), ("eval", "tile")}
AT_MOST_ONE = {("eval", "image_topk")}  # fractions in (0, 1]
NON_NEGATIVE = {("data", "num_workers"), ("data", "source_n"), ("train", "epochs"), ("train", "steps"),
                ("train", "time_budget_s"), ("train", "lr"), ("train", "weight_decay"),
                ("train", "warmup_steps"), ("train", "min_lr_ratio"), ("train", "seed"),
                ("train", "grad_clip"), ("train", "log_every"), ("train", "ckpt_every"),
                ("train", "ckpt_minutes"), ("train", "max_nonfinite_steps"),
                ("train", "eval_every"), ("train", "eval_batch_size"), ("train", "threads"),
                ("train", "backbone_lr_mult"), ("eval", "overlap")}


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names it."""


def default_config() -> Dict[str, Dict[str, Any]]:
    """A deep copy of :data:`DEFAULTS`."""
    return copy.deepcopy(DEFAULTS)


def _type_name(v) -> str:
    return {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}.get(
        type(v), type(v).__name__)


def _coerce(key: str, value, default):
    """``value`` as the type of ``default`` (file values and parsed overrides)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"config key {key} must be {_type_name(default)}, got {value!r}")


def _parse_toml_value(text: str):
    try:
        return tomllib.loads("v = " + text)["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_override_value(key: str, text: str, default):
    text = text.strip()
    if isinstance(default, bool):
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key {key} must be a bool (true/false), got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
            raise ConfigError(f"config key {key} must be an int, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key {key} must be a number, got {text!r}") from None
    if isinstance(default, str) and not (key.split(".")[-1] in SOURCE_KEYS and text.startswith("[")):
        v = _parse_toml_value(text) if text[:1] in ("'", '"') else text
        return v if isinstance(v, str) else text
    return _parse_toml_value(text)


def apply_override(cfg: Dict[str, Any], item: str) -> None:
    """Apply one ``section.key[.subkey...]=value`` override to ``cfg`` in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must look like section.key (e.g. train.lr)")
    section = parts[0]
    if section not in DEFAULTS:
        raise ConfigError(f"unknown config section [{section}] in override {key!r}; "
                          f"sections: {', '.join(DEFAULTS)}")
    if section in FREE_FORM:  # free-form: validated by the method (or the demo) itself
        node = cfg.setdefault(section, {})
        for p in parts[1:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {section}.{p} is not a table")
            node = nxt
        node[parts[-1]] = _parse_toml_value(text.strip())
        return
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {key!r}: [{section}] has no sub-tables")
    name = parts[1]
    if name not in DEFAULTS[section]:
        raise ConfigError(f"unknown config key {key!r}; keys of [{section}]: "
                          f"{', '.join(DEFAULTS[section])}")
    cfg[section][name] = _parse_override_value(key, text, DEFAULTS[section][name])


def _merge_file(cfg: Dict[str, Any], data: Dict[str, Any], origin: str) -> None:
    for section, table in data.items():
        if section not in DEFAULTS:
            raise ConfigError(f"unknown config section [{section}] in {origin}; "
                              f"sections: {', '.join(DEFAULTS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] in {origin} must be a table, got {table!r}")
        if section in FREE_FORM:
            cfg[section] = copy.deepcopy(table)
            continue
        for name, value in table.items():
            if name not in DEFAULTS[section]:
                raise ConfigError(f"unknown config key '{section}.{name}' in {origin}; keys of "
                                  f"[{section}]: {', '.join(DEFAULTS[section])}")
            cfg[section][name] = value


def validate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Type- and range-check ``cfg`` in place (sources excepted: the data set checks them)."""
    for section, defaults in DEFAULTS.items():
        if section in FREE_FORM:
            if not isinstance(cfg.get(section), dict):
                raise ConfigError(f"[{section}] must be a table")
            continue
        for name, default in defaults.items():
            key = f"{section}.{name}"
            value = cfg[section][name]
            if section == "data" and name in SOURCE_KEYS:
                if not isinstance(value, (str, list)):
                    raise ConfigError(f"config key {key} must be a path or a list of paths, got {value!r}")
                continue
            value = cfg[section][name] = _coerce(key, value, default)
            choices = CHOICES.get((section, name))
            if choices and value not in choices:
                raise ConfigError(f"config key {key} must be one of {', '.join(choices)}; got {value!r}")
            if (section, name) in POSITIVE and not value > 0:
                raise ConfigError(f"config key {key} must be > 0, got {value!r}")
            if (section, name) in AT_MOST_ONE and not 0 < value <= 1:
                raise ConfigError(f"config key {key} must be in (0, 1], got {value!r}")
            if (section, name) in NON_NEGATIVE and not value >= 0:
                raise ConfigError(f"config key {key} must be >= 0, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key {key} must be finite, got {value!r}")
    if not cfg["train"]["method"]:
        raise ConfigError("config key train.method must name a method")
    if not cfg["output"]["dir"]:
        raise ConfigError("config key output.dir must not be empty")
    if cfg["train"]["steps"] == 0 and cfg["train"]["epochs"] == 0 and cfg["train"]["time_budget_s"] == 0:
        raise ConfigError("nothing to train: set train.epochs, train.steps or train.time_budget_s")
    return cfg


def read_toml(path) -> Dict[str, Any]:
    """The tables of a TOML file; :class:`ConfigError` naming the file when it cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (),
                base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults (or ``base``), then the TOML file at ``path``, then ``overrides``; validated.

    Raises :class:`ConfigError` (one line naming the file, section or key) on any problem.
    """
    cfg = copy.deepcopy(base) if base is not None else default_config()
    for section in DEFAULTS:
        cfg.setdefault(section, copy.deepcopy(DEFAULTS[section]))
        if section not in FREE_FORM:  # a base from an older checkpoint may lack newer keys
            for name, default in DEFAULTS[section].items():
                cfg[section].setdefault(name, copy.deepcopy(default))
    if path is not None:
        _merge_file(cfg, read_toml(path), os.fspath(path))
    for item in overrides:
        apply_override(cfg, item)
    return validate(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {v!r} as TOML")


def config_to_toml(cfg: Dict[str, Any]) -> str:
    """The config as TOML text that :func:`load_config` reads back to the same dict."""
    lines = []
    for section in DEFAULTS:
        table = cfg.get(section, {})
        lines.append(f"[{section}]")
        for k, v in table.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
