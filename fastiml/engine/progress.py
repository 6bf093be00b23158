"""Progress display on stderr and the JSON-lines training log.

:class:`Progress` redraws one line in place (``\\r``) when stderr is a terminal and prints plain
lines every ``every`` steps otherwise (log files, CI). :class:`JsonlLog` appends one JSON object
per line; :class:`Window` accumulates per-step numbers between two log records.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional, TextIO

__all__ = ["Progress", "JsonlLog", "Window", "format_duration", "json_safe"]


def format_duration(seconds: Optional[float]) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """A progress line: ``[stage] step/total |bar| loss 0.4321 · 12.3 img/s · data 4% · ETA 3m05s``.

    Args:
        stream: where to write (stderr by default).
        enabled: False prints nothing (non-main DDP ranks, ``train.progress = false``).
        every: steps between plain lines when the stream is not a terminal.
        width: bar width in characters (terminal mode).
    """

    def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True, every: int = 10,
                 width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.every = max(1, int(every))
        self.width = width
        try:
            self.tty = bool(self.stream.isatty()) and os.environ.get("TERM") != "dumb"
        except (AttributeError, ValueError):
            self.tty = False
        self._last_draw = 0.0
        self._open_line = False

    def update(self, step: int, total: Optional[int], *, stage: str = "", loss: float = math.nan,
               imgs_per_s: float = math.nan, data_wait: float = math.nan,
               eta_s: Optional[float] = None, lr: Optional[float] = None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_draw < 0.2 and (total is None or step < total):
                return
        elif not force and step % self.every != 0:
            return
        self._last_draw = now
        parts = []
        if stage:
            parts.append(f"[{stage}]")
        if total:
            parts.append(f"step {step}/{total}")
            if self.tty:
                filled = int(self.width * min(1.0, step / total))
                parts.append("|" + "#" * filled + "-" * (self.width - filled) + "|")
        else:
            parts.append(f"step {step}")
        stats = [f"loss {loss:.4f}"]
        if lr is not None:
            stats.append(f"lr {lr:.2e}")
        if math.isfinite(imgs_per_s):
            stats.append(f"{imgs_per_s:.1f} img/s")
        if math.isfinite(data_wait):
            stats.append(f"data {100 * data_wait:.0f}%")
        stats.append(f"ETA {format_duration(eta_s)}")
        line = " ".join(parts) + " " + " · ".join(stats)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (ends the in-place line first)."""
        if not self.enabled:
            return
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class JsonlLog:
    """Append JSON objects, one per line, to ``path`` (``None``: write nothing). Standard JSON: a
    NaN or infinite number is written as ``null``."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: Dict) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def json_safe(x):
    """``x`` with every non-finite float replaced by None and other objects made JSON-able."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f if math.isfinite(f) else None


class Window:
    """Sums of per-step quantities since the last :meth:`reset` (one log record's worth). The loss
    of a skipped step (non-finite: no update) is counted in ``skipped``, not in the mean loss."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.images = 0
        self.loss = 0.0
        self.parts: Dict[str, float] = {}
        self.step_time = 0.0
        self.data_time = 0.0
        self.skipped = 0

    def add(self, loss: float, parts: Dict[str, float], images: int, step_time: float,
            data_time: float, skipped: bool = False) -> None:
        self.steps += 1
        self.images += images
        if skipped:
            self.skipped += 1
        else:
            self.loss += loss
            for k, v in parts.items():
                self.parts[k] = self.parts.get(k, 0.0) + v
        self.step_time += step_time
        self.data_time += data_time

    def summary(self) -> Dict[str, float]:
        n = self.steps - self.skipped
        t = max(self.step_time, 1e-12)
        return {
            "loss": self.loss / n if n > 0 else math.nan,
            "parts": {k: v / n for k, v in self.parts.items()},
            "skipped_steps": self.skipped,
            "imgs_per_s": self.images / t,
            "data_wait_fraction": self.data_time / t,
        }
