"""Checkpoints: everything needed to resume training or to rebuild the model for eval / predict.

A checkpoint is a ``torch.save``'d dict (loaded with ``weights_only=True``: plain containers,
numbers, strings and tensors only)::

    format      "fastiml-checkpoint"      version   1
    method      {"name": ..., "options": {...}}      the [method] table given to methods.build
    config      the full resolved config (data.size / data.mode are what predict needs)
    model       state_dict of the network (never of a DDP wrapper)
    optimizer   state_dict of the current stage's AdamW (None in a weights-only file)
    scheduler   state_dict of its warm-up + cosine schedule
    scaler      GradScaler state (fp16) or None
    progress    {"step", "stage", "stage_step", "stage_total", "epoch", "batch_in_epoch",
                 "elapsed_s", "stage_elapsed_s"}

No random-generator state: training derives every random draw from ``train.seed`` and the
position (epoch, item, step), so the position is all a resumed run needs (files of earlier
versions carry an ``rng`` entry, which is ignored).
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "model_from_checkpoint", "unwrap"]

FORMAT = "fastiml-checkpoint"
VERSION = 1
_REQUIRED = ("method", "config", "model")
_ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a fastiml checkpoint; the message names it."""


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP (or similar ``.module``) wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def save_checkpoint(path: str, *, model: nn.Module, method_name: str, method_options: dict,
                    config: dict, optimizer=None, scheduler=None, scaler=None,
                    progress: Optional[dict] = None) -> str:
    """Write a checkpoint atomically (temporary file, fsync, rename); returns ``path``."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "method": {"name": method_name, "options": method_options},
        "config": config,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "progress": dict(progress or {}),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
        _fsync_folder(folder)  # the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms where a folder cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read and check a fastiml checkpoint. Raises :class:`CheckpointError` naming the file when
    it is missing, truncated or corrupt, or not a fastiml checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises almost any type on a file that is not its own
        raise _unreadable(path) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"not a fastiml checkpoint (no '{FORMAT}' marker): {path}")
    if state.get("version") != VERSION:
        raise CheckpointError(f"unsupported fastiml checkpoint version {state.get('version')!r} "
                              f"(this fastiml reads version {VERSION}): {path}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"fastiml checkpoint lacks {', '.join(missing)}: {path}")
    return state


def _unreadable(path: str) -> CheckpointError:
    """The error for a file torch.load cannot read, in our words: torch.save writes a zip archive,
    so a file that starts like one (or is shorter than its first 4 bytes) but has no end record
    was cut short."""
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    size = os.path.getsize(path)
    advice = ("use another checkpoint of the run (an earlier checkpoints/step_*.pt or "
              "checkpoints/last.pt) or copy the file again")
    if _ZIP_MAGIC.startswith(head) and not zipfile.is_zipfile(path):
        return CheckpointError(f"checkpoint {path} is truncated ({size} bytes, without the end of "
                               f"the archive torch.save writes): {advice}")
    if head == _ZIP_MAGIC:
        return CheckpointError(f"checkpoint {path} is corrupt (a complete archive that torch "
                               f"cannot read as a checkpoint): {advice}")
    return CheckpointError(f"not a fastiml checkpoint (not a file torch.save writes): {path}")


def model_from_checkpoint(path_or_state, device="cpu") -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """(model in eval mode on ``device``, method, checkpoint dict) from a checkpoint path or dict."""
    from fastiml import methods

    state = load_checkpoint(path_or_state) if not isinstance(path_or_state, dict) else path_or_state
    name = state["method"]["name"]
    try:
        options = dict(state["method"]["options"])
        if (options.get("model") or {}).get("pretrained"):
            # The checkpoint holds the trained weights: do not fetch timm's pretrained ones again.
            options["model"] = {**options["model"], "pretrained": False}
        method = methods.build(name, **options)
        model = method.build_model()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint's method {name!r} cannot be rebuilt here: {e}") from None
    # A frozen stage (e.g. MPC's) matters only for training; state_dict keys are the same.
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit the method's model: {first}") from None
    model.to(device).eval()
    return model, method, state
