"""Mixed precision for training and evaluation: which autocast dtype ``train.amp`` means on a
device, and the autocast context itself."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["resolve_amp", "autocast"]


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` ("auto", "bf16", "fp16", "off") on ``device``; None = off.

    "auto" is bf16 on a CUDA device that supports it and off elsewhere (bf16 matmuls are slow on
    CPUs without bf16 hardware). "bf16" / "fp16" are honoured on any device (training with fp16
    scales its loss with a GradScaler, on the CPU too).
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {amp!r}")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
