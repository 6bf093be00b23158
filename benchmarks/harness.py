"""Shared machinery of the fastiml benchmarks (DESIGN section 8, STYLE rule 12).

Every benchmark script follows the same pattern:

* The parent process walks over the cases (sizes x dtypes x providers), and runs each
  (case, provider) pair in a **fresh subprocess** (``python -m benchmarks.<script> --case JSON``):
  peak memory is then that provider's alone, and one provider's caches or fragmentation cannot
  slow the next one. The child prints one tagged JSON line that the parent reads back.
* In the child: fix the thread count, build the inputs, record the memory in use, then time
  the provider (one warm-up run, median of ``repeat`` runs; a warm-up slower than ``slow_s``
  is itself the single measurement) and read the peak memory. On the CPU "memory" is the
  resident set size: the peak (``ru_maxrss``) is reset to the current RSS right after the
  inputs exist (``/proc/self/clear_refs``, Linux), so ``peak above inputs`` is what the
  provider itself needed (working set, autograd buffers, gradients). On CUDA it is
  ``torch.cuda.max_memory_allocated`` above the allocation after the inputs.
* Before launching a provider the parent applies guards: a memory guard (estimated bytes above
  ``--max-gb``: ``skipped (needs ~X GB)``) and, for quadratic baselines, a time guard (estimated
  from the same provider's time at a smaller size).
* Results go to one long-format CSV (``benchmarks/results.csv``: one row per metric, tagged with
  the run's timestamp, commit, machine and torch version), to an optional JSON file, and to a
  markdown table on stdout.

Absolute times on shared machines mean little: compare the ratios measured in the same run.
"""
import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = Path(__file__).resolve().with_name("results.csv")
CSV_COLUMNS = ("timestamp", "commit", "machine", "torch", "benchmark", "provider", "params",
               "metric", "value")
RESULT_TAG = "@@FASTIML_BENCH_RESULT@@ "
OK = "ok"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def dtype_of(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names the command lines accept)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


# The input dtypes a benchmark's ``--dtypes`` accepts (float64 is for references, not timings).
BENCH_DTYPES = ("float32", "float16", "bfloat16")


def add_dtypes_option(p: argparse.ArgumentParser, default: Sequence[str] = ("float32",),
                      what: str = "the inputs") -> None:
    """``--dtypes`` on a benchmark's parser: the run repeats per dtype, ``params["dtype"]``
    names it in every result (CSV, JSON, table); ``dtype_of`` turns a name into the dtype."""
    p.add_argument("--dtypes", nargs="+", default=list(default), choices=BENCH_DTYPES,
                   help=f"dtype of {what}, one run each (default {' '.join(default)})")


# ------------------------------------------------------------------------------ environment

def git_commit() -> str:
    """``git rev-parse --short HEAD`` (uncommitted changes are not noted); "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_levels() -> str:
    """The CPU kernels' level in force and torch's own (e.g. "fastiml avx512, torch AVX512")."""
    from fastiml import ops
    return (f"fastiml {ops.cpu_capability()}, "
            f"torch {torch.backends.cpu.get_cpu_capability()}")


def machine_info(device: str = "cpu") -> str:
    """Platform, CPU model, core count and CPU kernel levels (and the GPU's name for CUDA
    runs)."""
    info = (f"{platform.system()} {platform.machine()}; {cpu_model()}; {os.cpu_count()} cores; "
            f"{cpu_levels()}")
    if device == "cuda" and torch.cuda.is_available():
        info += f"; {torch.cuda.get_device_name()}"
    return info


def set_threads(n: Optional[int]) -> int:
    """Pins torch's intra-op thread count (default: all cores); returns it."""
    n = int(n) if n else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
    return device


# ----------------------------------------------------------------------------------- memory

def _status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def maxrss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def rss_mb() -> float:
    """Current resident set size in MiB (falls back to the peak where /proc is missing)."""
    now = _status_mb("VmRSS")
    return now if now is not None else maxrss_mb()


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of what runs between ``start()`` and ``stop()``, above what existed at start.

    CPU: RSS (``ru_maxrss`` after a reset of the high-water mark). CUDA: the caching allocator's
    ``max_memory_allocated``. Values in MiB.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.base = 0.0
        self.peak_was_reset = True

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = rss_mb()
            self.peak_was_reset = reset_peak_rss()

    def stop(self) -> Dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = maxrss_mb()
        return {"inputs_mb": self.base, "peak_mb": peak,
                "peak_above_inputs_mb": max(0.0, peak - self.base),
                "peak_was_reset": self.peak_was_reset}


# ----------------------------------------------------------------------------------- timing

def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], object], *, repeat: int = 3, device="cpu", warmup: int = 1,
            slow_s: float = 5.0) -> Dict[str, object]:
    """Median wall time of ``fn()`` in seconds.

    ``warmup`` untimed runs first, then ``repeat`` timed ones. When the first run already took
    ``slow_s`` seconds or more, it is the one measurement (``repeat`` 1): one-time costs are
    negligible at that scale and the run budget is better spent elsewhere.
    """
    device = torch.device(device)
    first = _time_once(fn, device)
    if first >= slow_s or repeat < 1:
        return {"time_s": first, "times": [first], "repeat": 1}
    for _ in range(max(0, warmup - 1)):
        _time_once(fn, device)
    times = [_time_once(fn, device) for _ in range(repeat)]
    return {"time_s": statistics.median(times), "times": times, "repeat": repeat}


def time_mm(n: int, d: int, dtype: torch.dtype, device, *, repeat: int = 3,
            block_bytes: int = 256 << 20, slow_s: float = 5.0) -> Dict[str, object]:
    """Time of the full product (n x d) @ (d x n) with ``torch.mm`` -- the GEMM floor.

    Computed in row blocks written into one reused output buffer (at most ``block_bytes``), so
    that n = 65536 does not need a 17 GB result; every one of the n*n*d multiply-adds is done.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    bt = torch.randn(d, n, generator=g).to(device=device, dtype=dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, min(n, block_bytes // max(1, n * esize)))
    buf = torch.empty(rows, n, dtype=dtype, device=device)

    def full():
        for i in range(0, n, rows):
            r = min(rows, n - i)
            torch.mm(a[i:i + r], bt, out=buf[:r])

    return time_fn(full, repeat=repeat, device=device, slow_s=slow_s)


# ----------------------------------------------------------------------------------- guards

def memory_guard(estimate_bytes: float, max_gb: float) -> Optional[str]:
    """A ``skipped (needs ~X GB)`` status when the estimate exceeds the limit, else None."""
    if estimate_bytes > max_gb * 1e9:
        return f"skipped (needs ~{estimate_bytes / 1e9:.0f} GB)" if estimate_bytes >= 10e9 \
            else f"skipped (needs ~{estimate_bytes / 1e9:.1f} GB)"
    return None


class TimeGuard:
    """Skips a provider whose time, extrapolated from its last measurement at a smaller size
    (``t * (size / size0) ** exponent``), would exceed ``max_s``."""

    def __init__(self, max_s: float, exponent: float = 2.0):
        self.max_s = max_s
        self.exponent = exponent
        self._seen: Dict[tuple, tuple] = {}

    def record(self, key: tuple, size: float, seconds: float) -> None:
        self._seen[key] = (size, seconds)

    def check(self, key: tuple, size: float) -> Optional[str]:
        if key not in self._seen or self.max_s <= 0:
            return None
        size0, t0 = self._seen[key]
        estimate = t0 * (size / size0) ** self.exponent
        if estimate > self.max_s:
            return f"skipped (est. ~{estimate:.0f} s > {self.max_s:.0f} s)"
        return None


# ------------------------------------------------------------------------------ subprocesses

def child_main(run_case: Callable[[dict], dict], case_json: str) -> int:
    """Entry point of a child: runs one case and prints its result as one tagged JSON line."""
    case = json.loads(case_json)
    try:
        result = run_case(case)
        result.setdefault("status", OK)
    except Exception as e:  # reported to the parent as a failed case, not a crash
        result = {"status": f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"}
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def run_in_subprocess(module: str, case: dict, timeout: float = 900.0) -> dict:
    """Runs ``python -m <module> --case <json>`` from the repository root; returns its result.

    A child that dies (out of memory: killed by signal 9), times out or prints no result
    gives a ``failed (...)`` status instead of an exception.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", module, "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timeout after {timeout:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
        if proc.returncode == -9:
            why += ", out of memory?"
    else:
        why = f"exit {proc.returncode}"
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:160]
    return {"status": f"failed ({why}){': ' + tail if tail else ''}"}


# ---------------------------------------------------------------------------------- results

@dataclass
class Result:
    """One provider on one case: ``metrics`` maps a metric name to a number."""
    benchmark: str
    provider: str
    params: dict
    status: str = OK
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def get(self, metric: str) -> Optional[float]:
        return self.metrics.get(metric) if self.ok else None


def result_from_child(benchmark: str, provider: str, params: dict, out: dict,
                      keep: Sequence[str] = ()) -> Result:
    """Builds a :class:`Result` from a child's JSON (numbers only; ``times`` are dropped)."""
    status = out.get("status", OK)
    metrics = {}
    for name in ("time_s", "repeat", "peak_above_inputs_mb", "peak_mb", "inputs_mb",
                 *keep):
        value = out.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    return Result(benchmark, provider, dict(params), status, metrics)


@dataclass
class RunInfo:
    """What tags every row of one run."""
    timestamp: str
    commit: str
    machine: str
    torch: str

    @classmethod
    def collect(cls, device: str = "cpu") -> "RunInfo":
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        return cls(now, git_commit(), machine_info(device), torch.__version__)


def long_rows(info: RunInfo, results: Iterable[Result]) -> List[dict]:
    """Long format: one row per (result, metric); a skipped/failed result gives one
    ``status`` row whose value is the reason."""
    rows = []
    for r in results:
        base = {"timestamp": info.timestamp, "commit": info.commit, "machine": info.machine,
                "torch": info.torch, "benchmark": r.benchmark, "provider": r.provider,
                "params": json.dumps(r.params, sort_keys=True)}
        if not r.ok:
            rows.append({**base, "metric": "status", "value": r.status})
            continue
        for metric, value in r.metrics.items():
            rows.append({**base, "metric": metric, "value": f"{value:.6g}"})
    return rows


def append_csv(path, info: RunInfo, results: Iterable[Result]) -> int:
    """Appends the results to the long-format CSV (header written if the file is new)."""
    path = Path(path)
    rows = long_rows(info, results)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def write_json(path, info: RunInfo, benchmark: str, results: Iterable[Result], table: str,
               args: Optional[dict] = None) -> None:
    payload = {"benchmark": benchmark, "run": info.__dict__, "args": args or {},
               "results": [{"provider": r.provider, "params": r.params, "status": r.status,
                            "metrics": r.metrics} for r in results],
               "table_markdown": table}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


# ------------------------------------------------------------------------------- formatting

def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_seconds(r: Optional[Result]) -> str:
    """A time cell: ``0.123``, or the skip/failure reason."""
    if r is None:
        return "—"
    if not r.ok:
        return r.status
    return _sig(r.metrics["time_s"])


def fmt_mb(r: Optional[Result], metric: str = "peak_above_inputs_mb") -> str:
    if r is None or not r.ok or metric not in r.metrics:
        return "—"
    value = r.metrics[metric]
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


def _sig(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def find_result(results: Iterable[Result], provider: str, **params) -> Optional[Result]:
    """The first result of ``provider`` whose params hold every value given (None if none)."""
    return next((r for r in results if r.provider == provider
                 and all(r.params.get(k) == v for k, v in params.items())), None)


def ratio(num: Optional[Result], den: Optional[Result], metric: str = "time_s"
          ) -> Optional[float]:
    """``num / den`` of a metric when both results are ok, else None."""
    a = num.get(metric) if num is not None else None
    b = den.get(metric) if den is not None else None
    if a is None or b is None or b <= 0:
        return None
    return a / b


def add_baseline_ratios(ours: Result, base: Optional[Result], name: str) -> None:
    """Stores in ours.metrics its speed-up, peak-memory ratio and relative loss difference
    against `base`, a baseline of the same run (metrics named ``*_vs_<name>``); nothing for a
    ratio whose inputs are missing."""
    s = ratio(base, ours)
    if s is not None:
        ours.metrics[f"speedup_vs_{name}"] = s
    m = ratio(base, ours, "peak_above_inputs_mb")
    if m is not None:
        ours.metrics[f"memory_ratio_vs_{name}"] = m
    if base is not None and base.ok and "loss" in base.metrics and "loss" in ours.metrics:
        ref = ours.metrics["loss"]
        ours.metrics[f"loss_rel_diff_vs_{name}"] = abs(base.metrics["loss"] - ref) / max(
            abs(ref), 1e-12)


# ---------------------------------------------------------------------------- command lines

def base_parser(doc: str, repeat: int = 3) -> argparse.ArgumentParser:
    """The options every benchmark script shares; ``doc`` (the script's ``__doc__``) gives the
    description: its first paragraph, on one line."""
    p = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    p.add_argument("--repeat", type=int, default=repeat,
                   help=f"timed runs per case after one warm-up; the median is reported "
                        f"(default {repeat}; 1 when a single run takes over 5 s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every case (default: all cores)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cpu-capability", default=None,
                   choices=("default", "avx2", "avx512", "all"),
                   help="CPU kernel level for the whole run (FASTIML_CPU_CAPABILITY in every "
                        "case); 'all': the run once per level this CPU supports, one table "
                        "each (default: the best level)")
    p.add_argument("--max-gb", type=float, default=12.0,
                   help="skip a provider whose estimated memory exceeds this (default 12)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    p.add_argument("--csv", metavar="PATH", default=str(DEFAULT_CSV),
                   help="long-format CSV the results are appended to "
                        "(default benchmarks/results.csv)")
    p.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before one case's subprocess is abandoned (default 900)")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (debugging; memory figures are then "
                        "not per provider)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child mode (internal)
    return p


def main(parser: argparse.ArgumentParser, argv, *, benchmark: str,
         run_case: Callable[[dict], dict], run: Callable, table: Callable) -> int:
    """A benchmark script's entry point: a child runs its one case; the parent runs them all
    (``run(args)``), then prints ``table(results, args)`` and writes the CSV and JSON."""
    args = parser.parse_args(argv)
    if args.case is not None:
        return child_main(run_case, args.case)
    resolve_device(args.device)
    for level in cpu_levels_to_run(args.cpu_capability):
        info = RunInfo.collect(args.device)
        progress(f"[{benchmark}] CPU kernels: {cpu_levels()}")
        results = run(args)
        finish(args, info, benchmark, results, table(results, args))
    return 0


def cpu_levels_to_run(request: Optional[str]) -> Iterable[Optional[str]]:
    """Yields each CPU level a run asks for, with it in force here and in every child (through
    FASTIML_CPU_CAPABILITY); None: the level already in force."""
    from fastiml import ops
    if request is None:
        yield None
        return
    levels = ops.supported_cpu_capabilities() if request == "all" else (request,)
    for level in levels:
        ops.set_cpu_capability(level)  # ValueError, naming the level, where the CPU lacks it
        os.environ["FASTIML_CPU_CAPABILITY"] = level
        yield level


def run_case_anywhere(module: str, run_case: Callable[[dict], dict], case: dict,
                      in_process: bool, timeout: float) -> dict:
    """Runs one case in a fresh subprocess (the default) or, for tests, in this process."""
    if in_process:
        try:
            out = run_case(case)
            out.setdefault("status", OK)
            return out
        except Exception as e:
            return {"status": f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"}
    return run_in_subprocess(module, case, timeout)


def finish(args, info: RunInfo, benchmark: str, results: List[Result], table: str) -> None:
    """Prints the table and writes the CSV / JSON outputs asked for."""
    print(table)
    if not args.no_csv and args.csv:
        n = append_csv(args.csv, info, results)
        print(f"\n{n} rows appended to {args.csv}")
    if args.json:
        write_json(args.json, info, benchmark, results, table,
                   {k: v for k, v in vars(args).items() if k != "case"})
        print(f"results written to {args.json}")


def progress(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)

