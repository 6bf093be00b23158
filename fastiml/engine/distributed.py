"""torch.distributed set-up from the environment ``torchrun`` exports, and rank helpers.

``torchrun --nproc_per_node=N -m fastiml train --config C`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` reads them and joins the
process group (NCCL when the process has a CUDA device, gloo otherwise). Without them (or with
``WORLD_SIZE=1``) everything runs in one process and the helpers answer rank 0 of 1.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "teardown", "is_distributed", "rank", "world_size",
           "is_main", "barrier", "broadcast_object", "all_reduce_min", "all_reduce_sum",
           "any_over_ranks", "resolve_device"]


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node, its
    ``device``, and whether :func:`init_from_env` created the process group (``owned``)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:local_rank`` when CUDA is available, else cpu; ``"cuda"``:
    ``cuda:local_rank``; anything else as ``torch.device(spec)``. ValueError when the device is
    not usable here."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
    return device


def init_from_env(device: str = "auto", backend: Optional[str] = None,
                  timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        device: as :func:`resolve_device`; under torchrun each process takes ``cuda:LOCAL_RANK``.
        backend: "nccl" or "gloo"; default nccl for CUDA devices, gloo for the CPU.
        timeout_s: collective timeout.

    Returns a :class:`DistInfo`. A process group that already exists is used as it is (and not
    destroyed by :func:`teardown`).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank_ = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank_ if world > 1 else 0)
    if dist.is_available() and dist.is_initialized():
        world, rank_ = dist.get_world_size(), dist.get_rank()
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank_, world, local, dev, owned=False)
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, owned=False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set (launch with torchrun)")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank_,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank_, world, local, dev, owned=True)


def teardown(info: Optional[DistInfo] = None) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if info is not None and info.owned and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _reduce(value: float, op, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_min(value: float, device: torch.device = torch.device("cpu")) -> float:
    """The minimum of ``value`` over ranks."""
    return _reduce(value, dist.ReduceOp.MIN if dist.is_available() else None, device)


def all_reduce_sum(value: float, device: torch.device = torch.device("cpu")) -> float:
    """The sum of ``value`` over ranks."""
    return _reduce(value, dist.ReduceOp.SUM if dist.is_available() else None, device)


def any_over_ranks(flags, device: torch.device = torch.device("cpu")) -> list:
    """Per position, the largest of ``flags`` (numbers; booleans count as 0 / 1) over ranks: one
    all-reduce for several yes/no questions all ranks must answer alike."""
    values = [float(f) for f in flags]
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
