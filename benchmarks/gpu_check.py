"""The one-shot check to hand to a borrowed GPU: ``bash benchmarks/gpu_check.sh OUT_DIR``.

Builds the extension if needed, runs ``fastiml selftest --full``, then the headline timings with
the benchmark scripts' own command lines, and writes to OUT_DIR:

* ``summary.md``    the table: every part with its status and duration, the timings against
                    their bounds and targets, the selftest's failed and skipped rows;
* ``results.json``  the raw numbers: the machine, every part (command, status, seconds,
                    timeout), every selftest row, every benchmark result;
* ``logs/<part>.log`` each part's full output; ``raw/`` the benchmark scripts' JSON files.

Both files are rewritten after every part, so a run cut short still leaves what it measured.
The exit status is 1 when any part fails: a selftest row that fails (a kernel that disagrees
with the float64 reference), a part that crashes or runs past its time, a timing or memory
figure that misses its target (the README's bounds; ClipLoss / SigLipLoss: at most 736 MB and
faster than open_clip). Timings without a target are reported, never failed.

The parts, in order (sizes and repeats; "1 + 3 runs": one warm-up, the median of three):

==========  ================================================================================
build       only when ``fastiml.ops`` does not import, or a GPU is present and the extension
            has no CUDA kernels: ``FASTIML_CUDA=1 bash .ci/setup`` (plain ``bash .ci/setup``
            without a GPU). Downloads and nvcc, not GPU work: outside the budget, own cap
            (``--build-timeout``, 20 min).
probe       torch, the GPU, the extension (cap 90 s).
selftest    with a GPU ``fastiml selftest --full`` (every op x dtype x mode on the CPU and on
            CUDA, the shape sweep, 64-bit offsets, CPU vs CUDA, two runs bit-equal,
            compute-sanitizer, its own timing rows); without one
            ``fastiml selftest --device cpu --quick``. Gets what the budget leaves after
            reserving the timings' minimums (150 s, plus 3 s each to kill a part cut at its
            timeout): about 5 min of the default 8.
pair_stats  ``bench_pair_stats``: SupCon self mode, bfloat16, N = 65,536, D = 128, forward +
            backward, fused provider, 1 + 10 runs; target: at most twice the README's bound
            (``selftest.PAIR_BOUND_S``, 5.6 ms on an H100/H200). Cap 60 s, minimum 30 s.
mpc_b4      ``bench_mpc``: MPCLoss forward + backward, batch 4, 512^2, C = 256, float32, fused
mpc_b16     and the references its memory guard lets in, 1 + 3 runs; batch 16 likewise; target:
            fused time at 16 / at 4 at most ``selftest.MPC_BATCH_RATIO_TARGET`` (4.5). Cap 75 s,
            minimum 30 s, each.
clip        ``bench_clip --dtypes bfloat16``: ClipLoss, B = 65,536, D = 512, bfloat16 features,
            fastiml and open_clip, 1 + 3 runs each; targets (issue 25): fastiml's peak GPU
            memory above the inputs ``peak_above_inputs_mb`` at most 736 MB (siglip-kernel's
            figure; MEMORY_TARGET_MB) and its time below open_clip's (INFO, with open_clip's
            status, where open_clip did not run: its memory estimate when skipped). open_clip
            runs where its estimate (~52 GB) fits in 90 % of the GPU. Cap 45 s, minimum 20 s.
siglip      ``bench_siglip --dtypes bfloat16``: SigLipLoss likewise (B = 65,536, D = 512, bf16,
            1 + 3 runs, the same two targets). Cap 45 s, minimum 20 s.
ntxent      ``bench_ntxent``: NTXentLoss, SimCLR N = 65,536, D = 128, float32, 1 + 3 runs
            (report only). Cap 45 s, minimum 20 s.
==========  ================================================================================

The benchmarks run with ``--max-gb`` at half the GPU's memory (clip and siglip: 90 %,
``PEER_SHARE_OF``): a baseline (open_clip, pml, the MPC references) runs where its estimated
memory fits, else it is listed as skipped with its estimate. Without a GPU (or without CUDA
kernels) the timing parts are skipped with the reason and only the CPU selftest runs (~15 s on
2 cores).

Time: probe + selftest + timings stay within ``--budget`` (default 480 s: 8 minutes on one
H100) by design: each part runs under a timeout (its cap, clipped to what the budget has left
after the later parts' minimums and kill graces: ``reserve_s``), the whole process group is
killed at the timeout, and a part whose minimum no longer fits is not started (SKIP, with the
seconds left). The caps add up to 90 s (probe) + 345 s (timings); the minimums to 150 s. A
selftest cut at its timeout is a FAIL that lists the rows it finished (each row is saved as it
is made) and, in logs/selftest.log, the Python stack of the check that was running 5 s before
the cut. The selftest's own time on a GPU is not measured yet; its compute-sanitizer rows (when
the tool is on PATH) may take minutes each: if it is cut, rerun with a larger ``--budget``.

Options: ``--budget S``, ``--build-timeout S``, ``--no-build`` (never run .ci/setup: a
missing build fails), ``--python PATH`` (the interpreter that runs the parts; default
$FASTIML_PYTHON, else .venv/bin/python, else this one). Test hook: ``FASTIML_GPU_CHECK_SELFTEST``
names a module to run in place of ``fastiml.selftest`` (it must have selftest's ``run()``).

The driver itself needs only the standard library (it may run before torch is installed);
everything that imports torch runs in a subprocess of the chosen interpreter.
"""
import argparse
import datetime as _dt
import functools
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
DEFAULT_BUILD_TIMEOUT_S = 1200.0
PROBE_CAP_S = 90.0
SELFTEST_MIN_S = 30.0
# The timing parts: (name, cap, minimum) in seconds. The cap bounds a part; the minimum is
# what the budget keeps back for it while earlier parts run, and what it needs to start.
TIMING_PARTS = (("pair_stats", 60.0, 30.0), ("mpc_b4", 75.0, 30.0), ("mpc_b16", 75.0, 30.0),
                ("clip", 45.0, 20.0), ("siglip", 45.0, 20.0), ("ntxent", 45.0, 20.0))
PAIR_N, PAIR_D, PAIR_REPEAT = 65536, 128, 10
MPC_SIZE, MPC_DIM, MPC_BATCHES, MPC_REPEAT = 512, 256, (4, 16), 3
CONTRAST_B, CONTRAST_REPEAT = 65536, 3
# ClipLoss and SigLipLoss: bf16 features (issue 25's GPU target) at D = 512 (bench_clip.D).
CLIP_DTYPE, CLIP_D = "bfloat16", 512
# Their memory target: siglip-kernel's peak for SigLIP's loss at B = 65,536 bf16 on an H100,
# read as 736e6 bytes (the benchmarks' "MB" are MiB: 736 MB = 702 MiB).
MEMORY_TARGET_MB = 736.0
# Share of the GPU's memory a peer's (open_clip, pml, the MPC references) estimate may take.
# Half by default (the estimates are rough); ClipLoss and SigLipLoss are judged against
# open_clip's time, so it runs where its bf16 B x B matrices (~52 GB estimated at B = 65,536,
# siglip-kernel measured 33 GB) fit in 90 % of the GPU: an H100's 80 GB included. An
# out-of-memory crash of the peer is reported, not failed.
PEER_SHARE, PEER_SHARE_OF = 0.5, {"clip": 0.9, "siglip": 0.9}
SELFTEST_MODULE_ENV = "FASTIML_GPU_CHECK_SELFTEST"
BENCH_DEVICE = "cuda"  # the tests run the benchmark parts on "cpu", at small sizes
KILL_GRACE_S = 3.0  # SIGTERM to SIGKILL, at a timeout


# ------------------------------------------------------------------------------ small helpers

def _plain(x):
    """JSON-safe copy: NaN -> null, +-inf -> "inf" / "-inf" (strict parsers reject both)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    # benchmarks.harness has the same helper, but importing it imports torch, which the driver
    # must not need (it may run before the build).
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + (" (uncommitted changes)" if dirty.strip() else "")) if head else "unknown"


def run_logged(cmd: List[str], log: Path, timeout: float, env: Optional[dict] = None,
               header: str = "") -> Dict:
    """Runs `cmd` from the repository root, output to `log`; kills its whole process group at
    the timeout (the benchmark scripts start children that would otherwise keep the GPU).
    Returns rc (None when it timed out), seconds and timed_out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write((header + "\n" if header else "") + "$ " + " ".join(cmd)
                + f"\n(timeout {timeout:.0f} s)\n\n")
        f.flush()
        output_at = f.tell()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        seconds = time.monotonic() - start
        f.write(f"\n[gpu_check] {'timed out' if timed_out else f'exit {rc}'} after "
                f"{seconds:.1f} s\n")
    return dict(rc=rc, seconds=seconds, timed_out=timed_out, output_at=output_at)


def reserve_s(parts: Sequence[tuple]) -> float:
    """Seconds the budget keeps back for `parts` (TIMING_PARTS entries): each one's minimum and
    the grace its kill may take, so that a part cut at its timeout (and killed within
    KILL_GRACE_S) still leaves every later part its minimum."""
    return sum(minimum + KILL_GRACE_S for _, _, minimum in parts)


def _log_tail(log: Path, start: int = 0, lines: int = 3) -> str:
    """The last lines of a command's output in `log` (from byte `start`, after the header)."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            text = [line for line in f.read().decode(errors="replace").splitlines()
                    if line.strip() and not line.startswith("[gpu_check]")]
    except OSError:
        return ""
    return " / ".join(text[-lines:])[-300:]


# ------------------------------------------------------------------------ child entry points

def probe_child() -> int:
    """Prints one JSON line: torch, the GPU, the extension (runs in the checked interpreter)."""
    info: Dict[str, object] = {"python": sys.executable,
                               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cuda_available=torch.cuda.is_available())
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                        gpu_memory_gb=props.total_memory / 1e9,
                        capability=f"{props.major}.{props.minor}")
        from fastiml import ops, selftest
        info.update(ops="ok", compiled_with_cuda=ops.compiled_with_cuda(),
                    pair_bound_s=getattr(selftest, "PAIR_BOUND_S", None),
                    mpc_ratio_target=getattr(selftest, "MPC_BATCH_RATIO_TARGET", None),
                    compute_sanitizer=shutil.which("compute-sanitizer"))
        problem = getattr(ops, "_cuda_kernel_problem", None)
        if info["cuda_available"] and info["compiled_with_cuda"] and problem is not None:
            info["kernel_problem"] = problem(0)
    except Exception as e:  # noqa: BLE001 - reported: the build may fix it
        info["ops"] = f"{type(e).__name__}: {e}"
    print("@@probe " + json.dumps(info), flush=True)
    return 0


def selftest_child(json_path: str, rows_path: str, gpu: bool, dump_after_s: float) -> int:
    """Runs selftest.run() like ``fastiml selftest --full`` (``--device cpu --quick`` without a
    GPU), prints its table, writes its rows to `json_path`; each row is also appended to
    `rows_path` the moment it is made, and the Python stacks are dumped to the log after
    `dump_after_s`, so that a check that hangs is named when the part times out."""
    import faulthandler
    module = importlib.import_module(os.environ.get(SELFTEST_MODULE_ENV, "fastiml.selftest"))
    if dump_after_s > 0:
        faulthandler.dump_traceback_later(dump_after_s, exit=False)
    stream = open(rows_path, "w")

    def streamed(fn):
        @functools.wraps(fn)
        def case(*args, **kwargs):
            start = time.monotonic()
            out = fn(*args, **kwargs)
            for row in out if isinstance(out, list) else [out]:
                if isinstance(row, dict) and "status" in row:
                    seconds = time.monotonic() - start
                    stream.write(json.dumps(_plain(dict(row, wall_s=seconds))) + "\n")
                    stream.flush()
                    print(f"[selftest] {row.get('op')} {row.get('device')} {row.get('dtype')}: "
                          f"{row['status']} ({seconds:.1f} s)", file=sys.stderr, flush=True)
            return out
        return case

    # run() and full_rows() look the *_case functions up in the module at call time.
    for name, fn in list(vars(module).items()):
        if name.endswith("_case") and callable(fn):
            setattr(module, name, streamed(fn))
    rows = module.run(devices=None if gpu else ["cpu"], verbose=True, full=gpu, quick=not gpu)
    Path(json_path).write_text(json.dumps(_plain(rows)))
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


# ------------------------------------------------------------------------------- the driver

class Check:
    """One run: the parts done so far, the budget, and the two output files."""

    def __init__(self, out: Path, python: str, budget: float, build_timeout: float,
                 no_build: bool):
        self.out, self.python, self.budget = out, python, budget
        self.build_timeout, self.no_build = build_timeout, no_build
        self.parts: List[Dict] = []
        self.timings: List[Dict] = []
        self.selftest_rows: List[Dict] = []
        self.bench_json: Dict[str, Dict] = {}
        self.probe: Dict = {}
        self.started = _now()
        self.t0 = time.monotonic()
        self.budget_t0 = self.t0  # moved to the end of a build: the budget excludes it
        self.commit = _git_commit()
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "raw").mkdir(parents=True, exist_ok=True)

    # -- bookkeeping

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.budget_t0)

    def add(self, name: str, what: str, status: str, reason: str = "") -> Dict:
        """Records a part that ran no command (a skip, a refusal)."""
        return self.commit_part(dict(name=name, what=what, status=status, reason=reason,
                                     seconds=0.0, timeout_s=None, command="", log=""))

    def run_part(self, name: str, what: str, cmd: List[str], timeout: float,
                 env: Optional[dict] = None, equivalent: str = "") -> Dict:
        """Runs one command as a part; its status is FAIL on a timeout or a non-zero exit
        (the caller may refine it) and PASS otherwise."""
        log = self.out / "logs" / f"{name}.log"
        print(f"[gpu_check] {name}: {what} (timeout {timeout:.0f} s) ...", flush=True)
        r = run_logged(cmd, log, timeout, env=env,
                       header=f"# {what}" + (f"\n# equivalent to: {equivalent}" if equivalent
                                             else ""))
        if r["timed_out"]:
            status, reason = "FAIL", f"timed out after {timeout:.0f} s; see {log.name}"
        elif r["rc"] != 0:
            status, reason = "FAIL", f"exit {r['rc']}: {_log_tail(log, r['output_at'])}"
        else:
            status, reason = "PASS", ""
        return dict(name=name, what=what, status=status, reason=reason, seconds=r["seconds"],
                    timeout_s=timeout, command=" ".join(cmd), log=str(log.relative_to(self.out)))

    def commit_part(self, part: Dict) -> Dict:
        """Records a finished part, prints its line and rewrites the output files."""
        self.parts.append(part)
        took = "" if part["status"] == "SKIP" else f" in {part['seconds']:.1f} s"
        print(f"[gpu_check] {part['name']}: {part['status']}{took}"
              + (f" ({part['reason']})" if part["reason"] else ""), flush=True)
        self.write()
        return part

    def failed(self) -> List[Dict]:
        return [p for p in self.parts if p["status"] == "FAIL"]

    # -- build and probe

    def run_probe(self, name: str, timeout: float) -> Dict:
        part = self.run_part(name, "torch, the GPU and fastiml.ops in " + self.python,
                             [self.python, "-m", "benchmarks.gpu_check", "--probe"], timeout)
        log = self.out / part["log"]
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if line.startswith("@@probe ")]
        self.probe = json.loads(lines[-1][len("@@probe "):]) if lines else {}
        if self.probe.get("ops", "") != "ok" and part["status"] == "PASS":
            part.update(status="FAIL", reason=f"fastiml.ops: {self.probe.get('ops')}")
        elif not self.probe and part["status"] == "PASS":
            part.update(status="FAIL", reason="no probe output")
        elif self.probe.get("kernel_problem"):
            part.update(status="FAIL", reason=self.probe["kernel_problem"])
        return part

    def build_reason(self) -> Optional[str]:
        """Why a build is needed (None: it is not), from the probe."""
        if not self.probe:
            return f"no probe result from {self.python}"
        if self.probe.get("ops") != "ok":
            return "fastiml.ops does not import (see the probe)"
        if self.probe.get("cuda_available") and not self.probe.get("compiled_with_cuda"):
            return "a GPU is present but fastiml._C has no CUDA kernels"
        return None

    def build(self) -> bool:
        """Probes; builds and probes again when needed. True when fastiml.ops imports."""
        what = "build the extension if needed"
        probe = None
        if Path(self.python).exists() or shutil.which(self.python):
            probe = self.run_probe("probe", PROBE_CAP_S)
        reason = self.build_reason()
        if reason is None or self.no_build:
            if probe is not None:
                self.commit_part(probe)
            if reason is None:
                self.add("build", what, "SKIP", "not needed: fastiml.ops imports" + (
                    " with its CUDA kernels" if self.probe.get("compiled_with_cuda") else ""))
            else:
                self.add("build", what, "FAIL", f"needed ({reason}) but --no-build was given")
            return self.probe.get("ops") == "ok"
        if probe is not None:  # the build decides: this probe's finding is not a failure
            self.commit_part(dict(probe, status="PASS", reason=f"build needed: {reason}"))
        gpu = bool(self.probe.get("cuda_available")) or _nvidia_smi_lists_gpu()
        command = ("FASTIML_CUDA=1 " if gpu else "") + "bash .ci/setup"
        env = dict(os.environ, **({"FASTIML_CUDA": "1"} if gpu else {}))
        part = self.run_part("build", f"{command} ({reason})", ["bash", ".ci/setup"],
                             self.build_timeout, env=env, equivalent=command)
        self.commit_part(dict(part, command=command))
        self.budget_t0 = time.monotonic()
        if part["status"] != "PASS":
            return False
        venv = REPO / ".venv" / "bin" / "python"
        if venv.exists():
            self.python = str(venv)
        self.commit_part(self.run_probe("probe_after_build", PROBE_CAP_S))
        return self.probe.get("ops") == "ok"

    # -- the measured parts

    def gpu_skip_reason(self) -> Optional[str]:
        p = self.probe
        if p.get("ops") != "ok":
            return "fastiml.ops does not import"
        if not p.get("cuda_available"):
            why = "no GPU: torch.cuda.is_available() is False"
            if p.get("cuda_visible_devices") is not None:
                why += f" (CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']!r})"
            elif p.get("torch_cuda") is None:
                why += f" (torch {p.get('torch')} is a CPU build)"
            return why
        if not p.get("compiled_with_cuda"):
            return "fastiml._C was built without its CUDA kernels"
        if p.get("kernel_problem"):
            return p["kernel_problem"]
        return None

    def timeout_for(self, cap: float, minimum: float, reserve: float):
        """(timeout, None) or (None, skip reason): the cap clipped to the budget left after
        `reserve` seconds kept for the later parts."""
        available = self.left() - reserve - KILL_GRACE_S
        if available < minimum:
            return None, (f"budget: {max(0.0, self.left()):.0f} s of {self.budget:.0f} s left, "
                          f"{reserve:.0f} s kept for later parts; this part needs "
                          f"{minimum:.0f} s")
        return min(cap, available), None

    def selftest(self, gpu: bool, reserve: float) -> None:
        name = "selftest"
        what = ("fastiml selftest --full (CPU and CUDA)" if gpu
                else "fastiml selftest --device cpu --quick (no GPU: CPU part only)")
        timeout, skip = self.timeout_for(self.left(), SELFTEST_MIN_S, reserve)
        if skip:
            self.add(name, what, "SKIP", skip)
            return
        json_path = self.out / "raw" / "selftest.json"
        rows_path = self.out / "raw" / "selftest_rows.jsonl"
        for p in (json_path, rows_path):
            p.unlink(missing_ok=True)
        cmd = [self.python, "-m", "benchmarks.gpu_check", "--selftest-child", str(json_path),
               str(rows_path), "gpu" if gpu else "cpu", f"{max(1.0, timeout - 5):.0f}"]
        part = self.run_part(name, what, cmd, timeout, equivalent=what.split(" (")[0])
        if json_path.exists():
            self.selftest_rows = json.loads(json_path.read_text())
        elif rows_path.exists():  # cut short: the rows made before it stopped
            self.selftest_rows = [json.loads(line) for line in
                                  rows_path.read_text().splitlines() if line.strip()]
        bad = [r for r in self.selftest_rows if r["status"] == "FAIL"]
        if bad:
            names = ", ".join(f"{r['op']} {r['device']} {r['dtype']}" for r in bad[:6])
            more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
            part.update(status="FAIL", reason=f"{len(bad)} rows failed: {names}{more}"
                        + (f"; {part['reason']}" if part["reason"] else ""))
        elif part["status"] == "PASS" and not self.selftest_rows:
            part.update(status="FAIL", reason="no rows")
        counts = {s: sum(r["status"] == s for r in self.selftest_rows)
                  for s in ("PASS", "FAIL", "SKIP", "INFO")}
        if part["status"] == "PASS":
            part["reason"] = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        part["rows"] = counts
        self.commit_part(part)

    def bench(self, name: str, what: str, module: str, args: List[str], cap: float,
              minimum: float, reserve: float):
        """One benchmark script run (its own CLI, no CSV): (part, results) with the part not
        yet recorded (its timings decide its status), or (None, None) when skipped."""
        timeout, skip = self.timeout_for(cap, minimum, reserve)
        if skip:
            self.add(name, what, "SKIP", skip)
            return None, None
        raw = self.out / "raw" / f"{name}.json"
        raw.unlink(missing_ok=True)
        # Peers run where their memory estimate fits in their share of the GPU.
        max_gb = max(1.0, PEER_SHARE_OF.get(name, PEER_SHARE)
                     * float(self.probe.get("gpu_memory_gb") or 2.0))
        cmd = [self.python, "-m", module, "--device", BENCH_DEVICE, *args, "--no-csv", "--json",
               str(raw), "--max-gb", f"{max_gb:.0f}", "--timeout", f"{max(5.0, timeout - 5):.0f}"]
        part = self.run_part(name, what, cmd, timeout)
        results = []
        if raw.exists():
            self.bench_json[name] = json.loads(raw.read_text())
            results = self.bench_json[name]["results"]
        return part, results

    def finish_bench(self, part: Dict, timings: List[Dict]) -> None:
        """Records a benchmark part: FAIL when a required timing is missing or above target."""
        for t in timings:
            t["part"] = part["name"]
        self.timings += timings
        missing = [t for t in timings if t["value"] is None and t["status"] == "FAIL"]
        over = [t for t in timings if t["value"] is not None and t["status"] == "FAIL"]
        if part["status"] == "PASS" and missing:
            part.update(status="FAIL", reason="not measured: " + "; ".join(
                f"{t['name']}: {t['note']}" for t in missing))
        if over:
            part.update(status="FAIL", reason="; ".join(
                f"{t['name']}: {t['shown']} above its target {t['target_shown']}" for t in over)
                + (f"; {part['reason']}" if part["reason"] else ""))
        self.commit_part(part)

    def timing_parts(self, skip_reason: Optional[str]) -> None:
        """The benchmark parts in TIMING_PARTS order, or all of them skipped with the reason."""
        mpc: Dict[int, Optional[float]] = {}

        def mpc_rows(batch):
            def rows(results):
                row = self.fused_timing(f"MPCLoss B={batch}", results, "fused",
                                        f"{MPC_SIZE}^2 C={MPC_DIM} float32")
                mpc[batch] = row["value"]
                return [row] + ([self.mpc_ratio(mpc)] if batch == MPC_BATCHES[-1] else [])
            return rows

        def mpc_spec(batch):
            return (f"MPCLoss fwd+bwd B={batch} {MPC_SIZE}^2 C={MPC_DIM} float32, fused and the "
                    f"references that fit, 1 + {MPC_REPEAT} runs", "benchmarks.bench_mpc",
                    ["--batch", str(batch), "--size", str(MPC_SIZE), "--dim", str(MPC_DIM),
                     "--repeat", str(MPC_REPEAT)], mpc_rows(batch))

        contrast = ["--sizes", str(CONTRAST_B), "--repeat", str(CONTRAST_REPEAT)]

        def clip_spec(loss, module):
            return (f"{loss} fwd+bwd B={CONTRAST_B} D={CLIP_D} {CLIP_DTYPE}, fastiml and "
                    f"open_clip if it fits, 1 + {CONTRAST_REPEAT} runs", module,
                    contrast + ["--dtypes", CLIP_DTYPE],
                    lambda results: self.clip_timings(f"{loss} B={CONTRAST_B}", results))

        specs = {  # name -> (what, module, arguments, timings from its results)
            "pair_stats": (
                f"pair_stats SupCon self mode bf16 N={PAIR_N} D={PAIR_D} fwd+bwd, fused, "
                f"1 + {PAIR_REPEAT} runs", "benchmarks.bench_pair_stats",
                ["--sizes", str(PAIR_N), "--dtypes", "bfloat16", "--providers", "fused",
                 "--modes", "self", "--repeat", str(PAIR_REPEAT)],
                lambda results: [self.pair_timing(results)]),
            "mpc_b4": mpc_spec(MPC_BATCHES[0]),
            "mpc_b16": mpc_spec(MPC_BATCHES[1]),
            "clip": clip_spec("ClipLoss", "benchmarks.bench_clip"),
            "siglip": clip_spec("SigLipLoss", "benchmarks.bench_siglip"),
            "ntxent": (
                f"NTXentLoss fwd+bwd SimCLR N={CONTRAST_B} D=128 float32, fastiml and pml if "
                f"it fits, 1 + {CONTRAST_REPEAT} runs", "benchmarks.bench_ntxent",
                contrast + ["--class-sizes"],
                lambda results: [self.fused_timing(f"NTXentLoss SimCLR N={CONTRAST_B}",
                                                   results, "fastiml", "D=128 float32")]),
        }
        for i, (name, cap, minimum) in enumerate(TIMING_PARTS):
            what, module, args, timings_of = specs[name]
            if skip_reason:
                self.add(name, what, "SKIP", skip_reason)
                continue
            reserve = reserve_s(TIMING_PARTS[i + 1:])
            part, results = self.bench(name, what, module, args, cap, minimum, reserve)
            if part is not None:
                self.finish_bench(part, timings_of(results))

    # -- timings from the benchmark results

    @staticmethod
    def _peers(results: List[Dict], ours: Dict) -> str:
        """The other providers of one run: time or skip reason, and the loss check (the
        benchmarks store it on our result as loss_rel_diff_vs_<peer>)."""
        out = []
        for r in results:
            if r is ours:
                continue
            text = f"{r['provider']}: " + (_s(r["metrics"].get("time_s")) if r["status"] == "ok"
                                           else r["status"])
            diff = ours["metrics"].get(f"loss_rel_diff_vs_{r['provider']}")
            out.append(text + ("" if diff is None else f" (loss rel. diff {diff:.1e})"))
        return "; ".join(out)

    def fused_timing(self, name: str, results: List[Dict], ours: str, shape: str) -> Dict:
        fused = next((r for r in results if r["provider"] == ours), None)
        value = fused["metrics"].get("time_s") if fused and fused["status"] == "ok" else None
        note = self._peers(results, fused) if value is not None else (
            fused["status"] if fused else "no result")
        return dict(name=name, shape=shape, value=value, unit="s", shown=_s(value), bound=None,
                    target=None, target_shown="—", status="INFO" if value is not None
                    else "FAIL", note=note)

    def pair_timing(self, results: List[Dict]) -> Dict:
        row = self.fused_timing("pair_stats fwd+bwd", results, "fused",
                                f"self N={PAIR_N} D={PAIR_D} bfloat16")
        row["shown"] = _ms(row["value"])
        bound = self.probe.get("pair_bound_s")
        if bound:
            row.update(bound=bound, target=2 * bound, target_shown=f"≤ {_ms(2 * bound)} "
                       f"(2 × bound)")
            if row["value"] is not None:
                row["status"] = "PASS" if row["value"] <= 2 * bound else "FAIL"
                row["note"] = (f"{row['value'] / bound:.2f} × the README's bound "
                               f"{_ms(bound)}")
        fused = next((r for r in results if r["provider"] == "fused"), None)
        if fused and fused["status"] == "ok":
            m = fused["metrics"]
            extra = [f"{label} {m[k]:.2f}" for k, label in (
                ("roofline", "fused / 4·mm"), ("gemm_roofline", "fused / its products at the "
                                                               "GEMM rate")) if k in m]
            if "gemm_gflops" in m:
                extra.append(f"bf16 GEMM {m['gemm_gflops'] / 1e3:.1f} TFLOP/s")
            row["note"] = "; ".join([row["note"]] + extra) if row["note"] else "; ".join(extra)
        return row

    def clip_timings(self, name: str, results: List[Dict]) -> List[Dict]:
        """ClipLoss / SigLipLoss (issue 25's GPU targets): fastiml's time against open_clip's
        (faster: PASS, else FAIL; INFO, with open_clip's status -- its estimate when skipped
        for memory -- where open_clip did not run), and fastiml's peak memory above the
        inputs against MEMORY_TARGET_MB (PASS / FAIL). Without a fastiml result: the one FAIL
        row that says why."""
        shape = f"D={CLIP_D} {CLIP_DTYPE}"
        speed = self.fused_timing(name, results, "fastiml", shape)
        speed["target_shown"] = "< open_clip"
        if speed["value"] is None:
            return [speed]
        ours = next(r for r in results if r["provider"] == "fastiml")
        base = next((r for r in results if r["provider"] == "open_clip"), None)
        base = base if base is not None and base["status"] == "ok" else None  # it ran
        if base is not None:
            theirs = base["metrics"]["time_s"]
            speed.update(target=theirs, target_shown=f"< {_s(theirs)} (open_clip)",
                         status="PASS" if speed["value"] < theirs else "FAIL",
                         note=f"{theirs / speed['value']:.2f} × open_clip's speed; "
                              + speed["note"])
        else:
            speed["note"] = "not compared: " + speed["note"]
        mib = ours["metrics"].get("peak_above_inputs_mb")
        mb = None if mib is None else mib * 2**20 / 1e6
        memory = dict(name=f"{name} peak memory", shape=shape, value=mb, unit="MB",
                      shown="—" if mb is None else f"{mb:.0f} MB", bound=None,
                      target=MEMORY_TARGET_MB,
                      target_shown=f"≤ {MEMORY_TARGET_MB:.0f} MB (siglip-kernel)",
                      status="FAIL" if mb is None or mb > MEMORY_TARGET_MB else "PASS",
                      note="not measured" if mb is None else
                      "above the inputs (the features): activations, gradients, workspace")
        theirs_mib = base["metrics"].get("peak_above_inputs_mb") if base is not None else None
        if mb is not None and theirs_mib:
            more = theirs_mib / max(mib, 1e-9)
            memory["note"] += (f"; open_clip {theirs_mib * 2**20 / 1e6:.0f} MB "
                               f"({more:.{1 if more < 10 else 0}f} × more)")
        return [speed, memory]

    def mpc_ratio(self, fused: Dict[int, Optional[float]]) -> Dict:
        small, large = MPC_BATCHES
        target = self.probe.get("mpc_ratio_target")
        a, b = fused.get(small), fused.get(large)
        value = b / a if a and b else None
        # No value: a batch failed or was skipped, which its own part already reports.
        status = "INFO" if target is None or value is None else (
            "PASS" if value <= target else "FAIL")
        return dict(name=f"MPCLoss time B={large} / B={small}", shape=f"{MPC_SIZE}^2 float32",
                    value=value, unit="ratio", shown="—" if value is None else f"{value:.2f}",
                    bound=large / small, target=target,
                    target_shown="—" if target is None else f"≤ {target}",
                    status=status, note=(f"linear cost would be {large / small:.1f}"
                                         if value is not None else "a batch was not measured"))

    # -- output

    def payload(self) -> Dict:
        return _plain(dict(
            started=self.started, updated=_now(), seconds=time.monotonic() - self.t0,
            budget_s=self.budget, commit=self.commit, python=self.python, machine=self.probe,
            exit_status=1 if self.failed() else 0,
            settings=dict(pair_stats=dict(n=PAIR_N, d=PAIR_D, dtype="bfloat16",
                                          repeat=PAIR_REPEAT, warmup=1),
                          mpc=dict(batches=MPC_BATCHES, size=MPC_SIZE, dim=MPC_DIM,
                                   repeat=MPC_REPEAT, warmup=1),
                          contrast=dict(b=CONTRAST_B, repeat=CONTRAST_REPEAT, warmup=1,
                                        clip_siglip=dict(d=CLIP_D, dtype=CLIP_DTYPE,
                                                         memory_target_mb=MEMORY_TARGET_MB),
                                        ntxent=dict(d=128, dtype="float32")),
                          peer_share=dict(PEER_SHARE_OF, default=PEER_SHARE),
                          parts={n: dict(cap_s=c, min_s=m) for n, c, m in TIMING_PARTS}),
            parts=self.parts, timings=self.timings, selftest_rows=self.selftest_rows,
            benchmarks=self.bench_json))

    def summary(self) -> str:
        p = self.probe
        gpu = (f"{p['gpu']} ({p.get('gpu_memory_gb', 0):.0f} GB, compute capability "
               f"{p.get('capability')})" if p.get("gpu") else "no GPU")
        failed = self.failed()
        verdict = ("**PASS**" if not failed else
                   f"**FAIL** ({', '.join(x['name'] for x in failed)})")
        lines = [
            "# fastiml GPU check", "",
            f"{verdict} · {gpu} · torch {p.get('torch', '?')} (CUDA {p.get('torch_cuda')}) · "
            f"commit {self.commit} · started {self.started} · "
            f"{time.monotonic() - self.t0:.0f} s in all, budget {self.budget:.0f} s for the "
            "parts after the build", "",
            "## Parts", "",
            _table(["part", "what", "result", "seconds", "timeout s", "note"],
                   [[x["name"], x["what"], x["status"],
                     "—" if x["status"] == "SKIP" else f"{x['seconds']:.1f}",
                     "—" if x["timeout_s"] is None else f"{x['timeout_s']:.0f}", x["reason"]]
                    for x in self.parts]),
        ]
        if self.timings:
            lines += ["", "## Timings (median after one warm-up)", "",
                      _table(["timing", "shape", "measured", "target", "result", "note"],
                             [[t["name"], t["shape"], t["shown"], t["target_shown"],
                               t["status"], t["note"]] for t in self.timings])]
        if self.selftest_rows:
            rows = self.selftest_rows
            counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP",
                                                                       "INFO")}
            shown = [r for r in rows if r["status"] != "PASS" or r["op"].startswith("time ")]
            lines += ["", "## Selftest", "",
                      f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} "
                      f"skipped, {counts['INFO']} timings without a target; every row in "
                      "logs/selftest.log. Rows that did not pass, and its timing rows:", ""]
            fmt = lambda v: v if isinstance(v, str) else ("—" if v is None  # noqa: E731
                                                          else f"{v:.3g}")
            lines.append(_table(["op", "device", "dtype", "shape", "max error / value",
                                 "tolerance / target", "result"],
                                [[r["op"], r["device"], r["dtype"], r["shape"], fmt(r["error"]),
                                  fmt(r["tolerance"]), r["status"] + (
                                      f": {r['reason']}" if r["reason"] else "")]
                                 for r in shown]) if shown else "(none)")
        lines += ["", "Raw numbers: results.json; each part's output: logs/<part>.log.", ""]
        return "\n".join(lines)

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.payload(), indent=1) + "\n")
        (self.out / "summary.md").write_text(self.summary())


def _nvidia_smi_lists_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return os.environ.get("FASTIML_PYTHON") or (str(venv) if venv.exists() else sys.executable)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.sh", description=__doc__.split("\n")[0],
        epilog="Without a GPU only the CPU selftest runs; the GPU parts are listed as skipped.")
    parser.add_argument("out_dir", nargs="?", help="folder for summary.md, results.json, "
                        "logs/ and raw/ (created if missing)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the parts after the build (default "
                             f"{DEFAULT_BUDGET_S:.0f}: 8 min on one H100)")
    parser.add_argument("--build-timeout", type=float, default=DEFAULT_BUILD_TIMEOUT_S,
                        help="seconds for .ci/setup when a build is needed (default 1200)")
    parser.add_argument("--no-build", action="store_true",
                        help="never run .ci/setup (a missing build then fails the check)")
    parser.add_argument("--python", default=None,
                        help="interpreter that runs the parts (default $FASTIML_PYTHON, else "
                             ".venv/bin/python, else this one)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--selftest-child", nargs=4, help=argparse.SUPPRESS,
                        metavar=("JSON", "ROWS", "MODE", "DUMP_AFTER_S"))
    args = parser.parse_args(argv)
    if args.probe:
        return probe_child()
    if args.selftest_child:
        json_path, rows_path, mode, dump_after = args.selftest_child
        return selftest_child(json_path, rows_path, mode == "gpu", float(dump_after))
    if not args.out_dir:
        parser.error("OUT_DIR is required: the folder the table and raw numbers go to")
    if args.budget <= 0 or args.build_timeout <= 0:
        parser.error(f"--budget and --build-timeout must be positive seconds, got "
                     f"{args.budget} and {args.build_timeout}")
    check = Check(Path(args.out_dir).resolve(), args.python or default_python(), args.budget,
                  args.build_timeout, args.no_build)
    print(f"[gpu_check] writing to {check.out}; budget {args.budget:.0f} s after the build",
          flush=True)
    built = check.build()
    skip = check.gpu_skip_reason() if built else "no working build"
    gpu = skip is None
    if built:
        reserve = reserve_s(TIMING_PARTS) if gpu else 0.0
        check.selftest(gpu, reserve)
    else:
        check.add("selftest", "fastiml selftest", "SKIP", "no working build (see build/probe)")
    check.timing_parts(skip)
    check.write()
    print("\n" + (check.out / "summary.md").read_text(), flush=True)
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
