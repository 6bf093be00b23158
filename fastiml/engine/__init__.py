"""Training and evaluation layer: config, train loop, evaluation, checkpoints, progress, reports.

- :func:`load_config` / :data:`DEFAULTS` — TOML config with ``--set`` style overrides.
- :func:`train` — the training loop (AdamW + warm-up/cosine per stage, autocast, DDP, checkpoints,
  time budgets).
- :func:`evaluate`, :func:`robustness`, :func:`predict_image` — metrics and predictions.
- :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`model_from_checkpoint`.
- :mod:`fastiml.engine.report` — overlays, the loss-curve PNG, report.md.

Note: ``fastiml.engine.train`` is the function; the module is
``importlib.import_module("fastiml.engine.train")``.
"""
from .checkpoint import (CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint,
                         unwrap)
from .config import DEFAULTS, ConfigError, config_to_toml, default_config, load_config
from .evaluate import REQUIRED_KEYS, evaluate, predict_image, robustness
from .guards import TrainingDiverged, TrainingInterrupted
from .train import InMemoryDataset, WarmupCosine, build_dataset, build_method, train

__all__ = [
    "DEFAULTS", "ConfigError", "load_config", "default_config", "config_to_toml",
    "train", "TrainingInterrupted", "TrainingDiverged", "WarmupCosine", "InMemoryDataset", "build_dataset", "build_method",
    "evaluate", "robustness", "predict_image", "REQUIRED_KEYS",
    "CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "unwrap",
]
