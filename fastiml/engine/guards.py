"""What keeps a long training run safe: stop signals, non-finite steps and weights, the global
state a run changes.

- :class:`StopSignals` turns the first SIGINT / SIGTERM into a request the loop polls between steps
  (it then saves a resumable checkpoint and raises :class:`TrainingInterrupted`); a second signal
  acts as it would without fastiml (Ctrl-C raises KeyboardInterrupt at once). A signal that was
  ignored when it started stays ignored.
- :class:`TrainingDiverged`: too many consecutive steps had a non-finite loss or gradient, or an
  update blew the weights up.
- :func:`non_finite_weights` lists the tensors of a state dict that are not finite: checkpoints
  are never written with them.
- :class:`GlobalState` saves and restores the thread count and the RNGs ``train()`` sets.
"""
from __future__ import annotations

import glob
import os
import signal
import threading
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["StopSignals", "TrainingInterrupted", "TrainingDiverged", "non_finite_weights",
           "remove_stale_temp_files", "GlobalState", "ignore_interrupts_in_worker", "skipped_files"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal; ``checkpoint`` is the resumable checkpoint it saved."""

    def __init__(self, message: str, signum: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite for ``train.max_nonfinite_steps`` steps, or an
    update left the weights non-finite or exploded (see :func:`fastiml.engine.train`)."""


class StopSignals:
    """Context manager: while active, SIGINT / SIGTERM set :attr:`received` (the signal number)
    instead of stopping the process; on exit (or at the first signal) each handler is put back as
    it was, whatever it was.

    A signal ignored (``SIG_IGN``) on entry is left ignored: a shell starts background jobs
    (``cmd &``, ``nohup cmd &``) with SIGINT ignored, and a run its launcher made deaf to
    SIGINT must not become interruptible by it; such a run stops on SIGTERM (``kill <pid>``).
    Installed only in the main thread (Python allows handlers nowhere else); elsewhere it is a
    no-op that never receives anything."""

    def __init__(self):
        self.received = 0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()  # a second signal acts as usual

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, but only the training
    process should act on it (its workers are shut down with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def non_finite_weights(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def remove_stale_temp_files(*folders: str) -> List[str]:
    """Delete the ``.tmp_*.pt`` files a killed run left in ``folders`` (checkpoint writes in
    progress); returns their paths."""
    removed = []
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder), ".tmp_*.pt")):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


class GlobalState:
    """torch's intra-op thread count and the torch / CUDA / NumPy RNG states, captured at creation
    and put back by :meth:`restore` (``train()`` sets all of them)."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = (torch.cuda.get_rng_state_all()
                         if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        self.numpy_rng = np.random.get_state()

    def restore(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)


def skipped_files(dataset) -> List[Dict[str, str]]:
    """``[{"file", "reason"}]`` for the pairs a data set skipped as unreadable
    (:attr:`fastiml.data.ForgeryDataset.skipped`); [] for a data set that keeps no such list."""
    return [{"file": path, "reason": reason} for path, reason in getattr(dataset, "skipped", [])]
