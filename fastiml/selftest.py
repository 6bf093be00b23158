"""``fastiml selftest``: every fused op against its plain-PyTorch reference, on every device.

The first thing to run on a new machine (DESIGN 7): the CUDA kernels were compiled where no GPU
exists, so this is where they first meet one. For each available device ("cpu", and "cuda" when
``torch.cuda.is_available()``) and each dtype (float32, float16, bfloat16) it runs

* ``pair_stats`` forward and backward in five modes: general (q vs k), self (k = None with
  exclude_self), groups, negatives-only denominator, ignored labels;
* ``pair_softplus`` (NT-Xent's positive-pair sum) forward and backward in four of those modes;
* ``contour_mine`` and ``contour_band`` (on masks of several dtypes: their outputs are exact);
* ``pivot_consistency`` forward and backward;
* the all-pairs ops ``clip_lse``, ``siglip_loss`` and ``row_lse`` (the latter with ``k``
  without a gradient -- the elementwise backward from the saved mean -- and with one --
  ``clip_lse``'s backward), every output and the gradients of the features, the scale and the
  bias, on N = 300 rows against M = 530 columns (across the CPU kernels' 256-tiles; one row
  chunk of the CUDA ops: ``--full`` adds rows across their chunks);

and compares each output with ``fastiml.reference`` computed in float64 from the *same* rounded
inputs. float16 and bfloat16 results are judged by the test suite's low-precision rule
(``fastiml.testing.half_rule``: per row, a documented multiple of the dtype's epsilon times the
float64 result's scale, plus float32's error in the similarities); float32 and float64 ones by
FlashAttention's rule: at most twice the error of the plain-PyTorch reference run in the same
dtype (on the same device), plus a floor of a few units in the last place at the scale
(max |exact|) of the result. Integer and boolean outputs must match exactly, as must the pattern
of ``-inf`` entries. An op whose kernel is not registered for a device (not built yet, or built
without CUDA) is reported as SKIP with the reason, never as a crash.

``--full`` (the one-shot GPU verification; on one H100/H200 it is sized to finish in a few
minutes) adds, in the same table:

* a shape sweep of ``pair_stats`` in float64 too: partial tiles, D not a multiple of 16,
  N = M = 1, empty denominators, all-ignored rows, general and self mode (``sweep/*`` rows);
* multi-tile blocks (CUDA): at the sizes above the CUDA schedule splits every block's list into
  single tiles (about two work items per SM), so every ``pair_stats`` and ``pair_softplus`` mode
  runs again in every dtype under the test hook ``FASTIML_CUDA_FORCE_TILES=multi`` (rows
  ``... (unsplit)``: each block walks its whole list of >= 2 tiles; pair_softplus tiles of 64);
  ``pair_stats`` at N = M = 2 x SMs x 64 + 40 in bfloat16 with the default schedule, checked
  against float64 on every row (the reference in row chunks); and float16 self mode with two
  groups whose upstream gradients differ by 10^6, the boundary inside a tile (the dk pass's
  rescale between row tiles), each group judged at its own scale, with and without the hook;
* ``pair_softplus`` in float32 with ``torch.backends.cuda.matmul.allow_tf32`` on (CUDA, rows
  ``... (TF32 on)``): its tile products must stay full float32 (each s_ij meets an exact lse)
  and the user's setting must be back on after the call;
* the all-pairs ops across the CUDA row chunks (``clip_lse/large`` ... rows): on CUDA they run
  on chunks of 2^24 / M rows, so N = 2,100 against M = 16,400 (D = 8, float32) spans 3 chunks
  (the shape names the count) -- every output and gradient against float64 computed on the
  device (on the CPU and with ``--quick``: N = 600, M = 1,100, 1 chunk);
* 64-bit offsets: q of N x 128 with N x D > 2^31 (CUDA only; the rows past 2^31 elements are
  checked against the float64 reference);
* CPU against CUDA: ``contour_mine`` and ``contour_band`` bit-equal on every mask dtype;
* two runs bit-equal: every op's outputs and gradients, run twice (on CUDA also under the
  hook);
* no host synchronisation (CUDA): ``pair_stats`` forward and backward in self mode and with
  groups (bfloat16) under ``torch.cuda.set_sync_debug_mode("warn")``, rows ``... (syncs)``: each
  synchronising call is counted, and any fails the row;
* ``compute-sanitizer`` memcheck / racecheck / synccheck on small calls of every op (when the
  tool is on PATH), in all four dtypes under the hook and in float32 / bfloat16 without it;
* timings, against targets: ``pair_stats`` bf16 N = 65,536 D = 128 self mode forward + backward
  against twice the README's bound (5.6 ms on an H100/H200), and ``MPCLoss`` at batch 16
  against 4.5x batch 4 (512^2 images). Without a GPU, or with ``--quick``, they run at small
  sizes and are reported as INFO (no target).

``--quick`` runs the ``--full`` checks at small sizes (what the CPU tests exercise).

Usage: ``python -m fastiml.selftest [--device cpu|cuda ...] [--full] [--quick] [--quiet]
[--sanitizer-timeout SECONDS] [--json PATH]``; the exit status is non-zero when any check fails.
``run()`` returns the rows as dicts; ``--json`` writes them to a file.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from fastiml.testing import float32_arg_error, half_rule, similarity_span

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# float32 / float64 results: the tolerance is FACTOR x (error of the reference run in the same
# dtype) + a floor of FLOOR_ULPS units in the last place at the scale of the exact result
# (max |exact|); accumulated sums over a few hundred terms need that many. (Half-precision
# results: fastiml.testing.half_rule.)
FLOOR_ULPS = {torch.float32: 64, torch.float64: 64}
FACTOR = 2.0
TAU = 0.1
# The CUDA kernels' tile test hook (csrc/ops/pair_stats_host.h): "multi" makes every pair_stats
# block walk its whole list of tiles and gives pair_softplus tiles of 64.
FORCE_TILES_ENV = "FASTIML_CUDA_FORCE_TILES"
# The SM count assumed where no GPU is present (an H100's), for the schedule checks.
DEFAULT_SMS = 132

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _has_kernel(op: str, device: str) -> Optional[str]:
    """None when fastiml::op has a kernel for the device's dispatch key, else the reason."""
    key = _DISPATCH_KEYS[device]
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastiml::{op}", key)
    except RuntimeError as e:  # the schema itself is missing: stale module
        return f"fastiml::{op} is not defined ({e})"
    return None if ok else f"fastiml::{op} has no {key} kernel in this build"


def _api(name: str):
    """The Python entry point fastiml.ops.<name>, or None when this version has none."""
    from fastiml import ops
    return getattr(ops, name, None)


def _unavailable(name: str, device: str, kernels: Sequence[str] = ()) -> Optional[str]:
    """Why fastiml.ops.<name> cannot run on `device` (None when it can): the Python entry point
    is missing, or one of the ops it calls (``name`` itself and ``kernels``) has no kernel."""
    if _api(name) is None:
        return f"fastiml.ops has no {name}"
    for op in (name, *kernels):
        reason = _has_kernel(op, device)
        if reason:
            return reason
    return None


# ------------------------------------------------------------------------------ comparisons

def _max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), exact.detach().double().cpu()
    finite = torch.isfinite(e)
    if not finite.any():
        return 0.0
    return (a[finite] - e[finite]).abs().max().item()


def _floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """FLOOR_ULPS units in the last place of `dtype` at the scale max |exact| of the result --
    relative to the result, so that small outputs (per-pixel gradients) are checked as closely
    as large ones."""
    e = exact.detach().double().cpu()
    e = e[torch.isfinite(e)]
    scale = e.abs().max().item() if e.numel() else 0.0
    return FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the ops' statistics for inputs of `dtype`: float64 for float64, else
    float32 (fastiml.ops' rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Checks:
    """The checks of one row: each output's error and tolerance; the row fails on any."""

    def __init__(self):
        self.items: List[Dict] = []

    def close(self, name: str, actual: torch.Tensor, exact: torch.Tensor,
              reference_low: torch.Tensor, dtype: torch.dtype) -> None:
        """float32 / float64 results: FlashAttention's rule; -inf entries must match, no NaN /
        +inf anywhere."""
        problem = None
        a = actual.detach().double().cpu()
        e = exact.detach().double().cpu()
        if a.shape != e.shape:
            problem = f"shape {tuple(a.shape)} != {tuple(e.shape)}"
        elif torch.isnan(a).any() or torch.isposinf(a).any():
            problem = "NaN or +inf in the result"
        elif not torch.equal(torch.isneginf(a), torch.isneginf(e)):
            problem = "-inf entries differ"
        err = _max_error(a, e) if problem is None else math.inf
        err_ref = _max_error(reference_low, e)
        tol = FACTOR * err_ref + _floor(e, dtype)
        self.items.append(dict(name=name, error=err, tolerance=tol, problem=problem,
                               ok=problem is None and err <= tol))

    def half(self, name: str, actual: torch.Tensor, exact: torch.Tensor,
             result_dtype: torch.dtype, arg_error: float, log_domain: bool = False) -> None:
        """Half-precision inputs: the suite's low-precision rule (fastiml.testing.half_rule) --
        ``result_dtype`` is what the result is rounded to (float32 statistics, gradients in the
        input dtype); the error and tolerance shown are the worst row's."""
        rule = half_rule(actual, exact, result_dtype, arg_error=arg_error, log_domain=log_domain)
        self.items.append(dict(name=name, error=rule.error, tolerance=rule.bound,
                               problem=rule.message or None, ok=rule.ok))

    def dtype(self, name: str, actual: torch.Tensor, want: torch.dtype) -> None:
        """A failed check named `name` when `actual` is not of dtype `want` (nothing when it
        is: the value checks already cover the output)."""
        if actual.dtype != want:
            self.items.append(dict(name=name, error=math.inf, tolerance=0.0, ok=False,
                                   problem=f"{actual.dtype}, expected {want}"))

    def exact(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        """Integer / boolean outputs: equal; the error is the number of mismatches."""
        a, e = actual.detach().cpu(), expected.detach().cpu()
        if a.shape != e.shape:
            self.items.append(dict(name=name, error=math.inf, tolerance=0.0, ok=False,
                                   problem=f"shape {tuple(a.shape)} != {tuple(e.shape)}"))
            return
        if a.dtype.is_floating_point or e.dtype.is_floating_point:
            mismatches = (a.double() != e.double()).sum().item()
        else:
            mismatches = (a.long() != e.long()).sum().item()
        self.items.append(dict(name=name, error=float(mismatches), tolerance=0.0,
                               problem=None, ok=mismatches == 0))

    def row(self, op: str, device: str, dtype: str, shape: str, seconds: float) -> Dict:
        # The reported output is the worst one relative to its tolerance.
        def ratio(item):
            if not item["ok"]:
                return math.inf
            return item["error"] / item["tolerance"] if item["tolerance"] > 0 else 0.0
        worst = max(self.items, key=ratio)
        failed = [i["name"] + (f" ({i['problem']})" if i["problem"] else "")
                  for i in self.items if not i["ok"]]
        return dict(op=op, device=device, dtype=dtype, shape=shape, output=worst["name"],
                    error=worst["error"], tolerance=worst["tolerance"],
                    status="FAIL" if failed else "PASS",
                    reason="failed: " + ", ".join(failed) if failed else "",
                    checks=self.items, seconds=seconds)


def _skip(op: str, device: str, dtype: str, shape: str, reason: str) -> Dict:
    return dict(op=op, device=device, dtype=dtype, shape=shape, output="", error=math.nan,
                tolerance=math.nan, status="SKIP", reason=reason, checks=[], seconds=0.0)


def _error_row(op: str, device: str, dtype: str, shape: str, exc: BaseException) -> Dict:
    return dict(op=op, device=device, dtype=dtype, shape=shape, output="", error=math.inf,
                tolerance=math.nan, status="FAIL", reason=f"{type(exc).__name__}: {exc}",
                checks=[], seconds=0.0)


# ------------------------------------------------------------------------------ pair_stats

# mode -> (N, M, D, options). D values cover: a multiple of 8 but not of 16 (padding), odd D,
# D > 128 (two column blocks of the CUDA backward), small D; N and M span several 64-tiles.
PAIR_MODES = {
    "general": (300, 257, 72, dict()),
    "self": (300, None, 37, dict(exclude_self=True)),
    "groups": (260, 260, 64, dict(groups=True, exclude_self=True)),
    "negatives": (200, 330, 136, dict(denominator="negatives")),
    "ignore": (310, 190, 16, dict(ignore=True)),
}
# --full's shape sweep (run in float64 too): partial tiles, D not a multiple of 16, N = M = 1,
# empty denominators (negatives-only with a single label; self mode's lone excluded pair), a
# whole tile of ignored rows.
SWEEP_MODES = {
    "sweep/partial": (65, 129, 24, dict()),
    "sweep/self-partial": (129, None, 20, dict(exclude_self=True)),
    "sweep/one": (1, 1, 5, dict()),
    "sweep/self-one": (1, None, 3, dict(exclude_self=True)),
    "sweep/empty-denominators": (90, 70, 16, dict(denominator="negatives", same_label=True)),
    "sweep/all-ignored-rows": (150, 100, 16, dict(ignore_rows=70)),
}
# --full: float16 self mode with two groups (image-major: rows 0-159 and 160-319, the boundary
# inside the third 64-row tile) whose upstream gradients differ by 10^6 -- the CUDA dk pass's
# range scale changes between the row tiles a column block walks (and rescales non-zero sums).
# Each group's rows are judged at their own scale.
TWO_GROUP_MODES = {
    "self-two-groups": (320, None, 64, dict(exclude_self=True, two_groups=(1e-3, 1e3))),
}
FULL_DTYPES = DTYPES + (torch.float64,)


def _pair_inputs(mode: str, dtype: torch.dtype, device: str, seed: int = 0):
    n, m, d, opt = {**PAIR_MODES, **SWEEP_MODES, **TWO_GROUP_MODES}[mode]
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    q_label = torch.randint(0, 4, (n,), generator=g)
    k = k_label = q_group = k_group = None
    if m is not None:
        k = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64),
                                          dim=1)
        k_label = torch.randint(0, 4, (m,), generator=g)
    if opt.get("groups"):
        q_group = torch.randint(0, 3, (n,), generator=g)
        k_group = q_group.clone() if opt.get("exclude_self") else torch.randint(0, 3, (m,),
                                                                                 generator=g)
        if opt.get("exclude_self"):  # the same set on both sides
            k, k_label = q.clone(), q_label.clone()
    if opt.get("ignore"):
        q_label[torch.rand(n, generator=g) < 0.15] = -1
        k_label[torch.rand(m, generator=g) < 0.15] = -1
    if opt.get("same_label"):
        q_label.zero_()
        if k_label is not None:
            k_label.zero_()
    if opt.get("ignore_rows"):
        q_label[:opt["ignore_rows"]] = -1
    # Upstream gradients of lse and pos_mean, rounded to the dtype like the inputs.
    w_lse = torch.randn(n, generator=g, dtype=torch.float64)
    w_pos = torch.randn(n, generator=g, dtype=torch.float64)
    row_parts = [("", slice(0, n))]  # rows judged together (their rms sets the scale)
    if opt.get("two_groups"):
        half = n // 2
        q_group = (torch.arange(n) >= half).long()
        scale = torch.tensor(opt["two_groups"], dtype=torch.float64)[q_group]
        w_lse, w_pos = w_lse * scale, w_pos * scale
        row_parts = [(" (group 0)", slice(0, half)), (" (group 1)", slice(half, n))]
    w_lse, w_pos = w_lse.to(dtype), w_pos.to(dtype)
    kwargs = dict(tau=TAU, exclude_self=bool(opt.get("exclude_self")),
                  denominator=opt.get("denominator", "all"))
    rounded = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    to_dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q=rounded(q), k=rounded(k), q_label=q_label, k_label=k_label, q_group=q_group,
                k_group=k_group, w_lse=w_lse, w_pos=w_pos, kwargs=kwargs, to_dev=to_dev,
                row_parts=row_parts, shape=f"N={n} M={m if m is not None else n} D={d}")


@contextlib.contextmanager
def forced_tiles(value: Optional[str]):
    """Sets the CUDA tile test hook (FORCE_TILES_ENV) to `value` for the block (None: leaves
    the environment as it is); restores the previous value after."""
    if value is None:
        yield
        return
    before = os.environ.get(FORCE_TILES_ENV)
    os.environ[FORCE_TILES_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_TILES_ENV, None)
        else:
            os.environ[FORCE_TILES_ENV] = before


@contextlib.contextmanager
def tf32_matmuls(on: bool):
    """``torch.backends.cuda.matmul.allow_tf32 = on`` for the block (False: leaves it as it
    is); restores the previous value after. Yields a list that receives the flag's value as
    the block left it (before the restore)."""
    seen: List[bool] = []
    if not on:
        yield seen
        return
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32
    flags.allow_tf32 = True
    try:
        yield seen
        seen.append(flags.allow_tf32)
    finally:
        flags.allow_tf32 = before


def _sm_count(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return DEFAULT_SMS


def _tiles_per_block(x, device: str, sms: Optional[int] = None) -> List[int]:
    """The number of column tiles each work item of pair_stats' CUDA forward walks, from the
    schedule op under the current hook: 64-row tiles, min_items 2 x SMs (min_items_for_device
    in csrc/ops/cuda/pair_stats_kernel.cu; `sms` default: the device's). The op applies the
    hook as the kernels do."""
    labels = x["q_label"] if x["k_label"] is None else x["k_label"]
    own_group = x["q_group"] if x["q_group"] is not None else torch.zeros_like(x["q_label"])
    other_group = own_group if x["k"] is None else (
        x["k_group"] if x["k_group"] is not None else torch.zeros_like(labels))
    own_group = torch.where(x["q_label"] == -1, -1, own_group).to(device)
    other_group = torch.where(labels == -1, -1, other_group).to(device)
    begin, _, _ = torch.ops.fastiml.pair_stats_tile_schedule(
        own_group, other_group, 64, False, 2 * (sms or _sm_count(device)))
    return (begin[1:] - begin[:-1]).tolist()


def _check_walks(checks: "_Checks", walks: List[int], tiles: Optional[str]) -> None:
    """The multi-tile rows must reach the multi-tile paths: some block walks >= 2 tiles."""
    most = max(walks, default=0)
    checks.items.append(dict(name=f"tiles per block (max {most})", error=float(most < 2),
                             tolerance=0.0, ok=most >= 2,
                             problem=None if most >= 2 else
                             f"the schedule walks {most} tile(s) per block under "
                             f"{FORCE_TILES_ENV}={tiles}"))


def _half_arg_error(x) -> float:
    """float32's error in the similarities of the inputs `x` (fastiml.testing)."""
    columns = x["q"].shape[0] if x["k"] is None else x["k"].shape[0]
    return float32_arg_error(similarity_span(x["q"], x["k"], TAU), columns)


def _pair_loss(lse, pos_mean, w_lse, w_pos):
    finite = torch.isfinite(lse)
    lse0 = torch.where(finite, lse, torch.zeros_like(lse))
    return (lse0 * w_lse.to(lse.dtype)).sum() + (pos_mean * w_pos.to(pos_mean.dtype)).sum()


def _pair_run(fn, x, device, dtype):
    """Runs fn (ops.pair_stats or reference.pair_stats) on `device` in `dtype` with autograd;
    returns (lse, pos_mean, pos_count, grad_q, grad_k)."""
    dev = x["to_dev"]
    q = dev(x["q"]).to(dtype).requires_grad_()
    k = None if x["k"] is None else dev(x["k"]).to(dtype).requires_grad_()
    lse, pos_mean, pos_count = fn(q, k, dev(x["q_label"]), dev(x["k_label"]), dev(x["q_group"]),
                                  dev(x["k_group"]), **x["kwargs"])
    loss = _pair_loss(lse, pos_mean, dev(x["w_lse"]), dev(x["w_pos"]))
    grads = torch.autograd.grad(loss, [t for t in (q, k) if t is not None])
    return lse, pos_mean, pos_count, grads[0], (grads[1] if k is not None else None)


def pair_stats_case(device: str, dtype: torch.dtype, mode: str,
                    impl: Optional[Callable] = None, tiles: Optional[str] = None) -> Dict:
    """One row: ops.pair_stats (or `impl`, same signature) in `mode` against the reference;
    `tiles`: the CUDA tile test hook's value for the op's calls (the row is named
    "... (unsplit)" for "multi", and also checks that the schedule walks >= 2 tiles per
    block)."""
    from fastiml import reference
    op = f"pair_stats/{mode}" + (" (unsplit)" if tiles == "multi" else "")
    x = _pair_inputs(mode, dtype, device)
    if impl is None:
        reason = _unavailable("pair_stats", device, ["pair_stats_backward"])
        if reason:
            return _skip(op, device, _dtype_name(dtype), x["shape"], reason)
        impl = _api("pair_stats")
    start = time.perf_counter()
    try:
        with forced_tiles(tiles):
            got = _pair_run(impl, x, device, dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            walks = _tiles_per_block(x, device) if tiles == "multi" else None
        exact = _pair_run(reference.pair_stats, dict(x, to_dev=lambda t: t), "cpu", torch.float64)
        half = dtype in HALF_DTYPES
        low = None if half else _pair_run(reference.pair_stats, x, device, dtype)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
        return _error_row(op, device, _dtype_name(dtype), x["shape"], e)
    checks = _Checks()
    arg_error = _half_arg_error(x) if half else 0.0
    for i, name in ((0, "lse"), (1, "pos_mean"), (3, "grad_q"), (4, "grad_k")):
        if exact[i] is None:
            continue
        if got[i] is None:
            checks.items.append(dict(name=name, error=math.inf, tolerance=0.0, ok=False,
                                     problem="missing"))
            continue
        if not half:
            checks.close(name, got[i], exact[i], low[i], dtype)
            continue
        # Statistics: float32, log-domain; gradients: the input dtype, relative (grad_k's rows
        # are k's, judged together).
        parts = x["row_parts"] if name != "grad_k" else [("", slice(None))]
        for suffix, rows in parts:
            checks.half(name + suffix, got[i][rows], exact[i][rows],
                        torch.float32 if i < 3 else dtype, arg_error, log_domain=i < 3)
    checks.exact("pos_count", got[2], exact[2])
    if walks is not None:
        _check_walks(checks, walks, tiles)
    for i, name, want in ((0, "lse.dtype", _stat_dtype(dtype)), (3, "grad_q.dtype", dtype)):
        checks.dtype(name, got[i], want)
    return checks.row(op, device, _dtype_name(dtype), x["shape"], time.perf_counter() - start)


SOFTPLUS_MODES = ("general", "self", "groups", "ignore")


def _softplus_run(fn, x, lse, device, dtype):
    """fn (ops.pair_softplus or reference.pair_softplus) on `device` in `dtype`, given the
    negatives' log-sum-exp; returns (total, grad_q, grad_k, grad_lse)."""
    dev = x["to_dev"]
    q = dev(x["q"]).to(dtype).requires_grad_()
    k = None if x["k"] is None else dev(x["k"]).to(dtype).requires_grad_()
    lse = dev(lse).to(_stat_dtype(dtype)).requires_grad_()
    kw = dict(tau=TAU, exclude_self=x["kwargs"]["exclude_self"])
    total, _ = fn(q, k, dev(x["q_label"]), dev(x["k_label"]), dev(x["q_group"]),
                  dev(x["k_group"]), lse=lse, **kw)
    loss = (total * dev(x["w_lse"]).to(total.dtype)).sum()
    inputs = [t for t in (q, k, lse) if t is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grad_k = grads[1] if k is not None else None
    return total, grads[0], grad_k, grads[-1]


def pair_softplus_case(device: str, dtype: torch.dtype, mode: str,
                       tiles: Optional[str] = None, tf32: bool = False) -> Dict:
    """One row: ops.pair_softplus (NT-Xent's positive-pair sum) in `mode` against the reference,
    with the negatives' log-sum-exp of the float64 reference (rounded to the statistics' dtype)
    as its input; `tiles`: the CUDA tile test hook's value for the op's calls ("multi": tiles of
    64, the row named "... (unsplit)"); `tf32`: the op called with
    ``torch.backends.cuda.matmul.allow_tf32`` on (row "... (TF32 on)"): its products must stay
    full float32 (they meet an exact lse), and the flag must be on again after the call."""
    from fastiml import reference
    op = (f"pair_softplus/{mode}" + (" (unsplit)" if tiles == "multi" else "")
          + (" (TF32 on)" if tf32 else ""))
    x = _pair_inputs(mode, dtype, device)
    reason = _unavailable("pair_softplus", device, ["pair_softplus_backward"])
    if reason:
        return _skip(op, device, _dtype_name(dtype), x["shape"], reason)
    start = time.perf_counter()
    half = dtype in HALF_DTYPES
    try:
        q64 = x["q"].double()
        k64 = None if x["k"] is None else x["k"].double()
        lse = reference.pair_stats(q64, k64, x["q_label"], x["k_label"], x["q_group"],
                                   x["k_group"], tau=TAU, exclude_self=x["kwargs"]["exclude_self"],
                                   denominator="negatives")[0]
        lse = lse.to(_stat_dtype(dtype)).double()
        with forced_tiles(tiles), tf32_matmuls(tf32) as flag_after:
            got = _softplus_run(_api("pair_softplus"), x, lse, device, dtype)
            if device == "cuda":
                torch.cuda.synchronize()
        if tf32 and flag_after != [True]:
            raise RuntimeError("pair_softplus left torch.backends.cuda.matmul.allow_tf32 off")
        exact = _softplus_run(reference.pair_softplus, dict(x, to_dev=lambda t: t), lse, "cpu",
                              torch.float64)
        low = None if half else _softplus_run(reference.pair_softplus, x, lse, device, dtype)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
        return _error_row(op, device, _dtype_name(dtype), x["shape"], e)
    checks = _Checks()
    arg_error = _half_arg_error(x) if half else 0.0
    for i, name in enumerate(("total", "grad_q", "grad_k", "grad_lse")):
        if exact[i] is None:
            continue
        if half:  # sums of softplus / sigmoid terms: all relative (tests/test_pair_softplus.py)
            checks.half(name, got[i], exact[i], dtype if i in (1, 2) else torch.float32,
                        arg_error)
        else:
            checks.close(name, got[i], exact[i], low[i], dtype)
    return checks.row(op, device, _dtype_name(dtype), x["shape"], time.perf_counter() - start)


# ------------------------------------------------------------------------------ all-pairs ops

class AllPairsCase(NamedTuple):
    """One all-pairs row: fastiml.ops.<op> (and fastiml.reference.<op>) called as
    ``op(q, k, *scalars, **kwargs)``."""
    op: str
    kernels: Tuple[str, ...]  # the other ops it calls (their kernels must exist)
    outputs: Tuple[str, ...]
    log_domain: Tuple[bool, ...]  # per output: a log-sum-exp / similarity, or a sum of terms
    scalars: Tuple[str, ...]  # learned scalars, after q and k
    k_grad: bool = True
    kwargs: Tuple[Tuple[str, object], ...] = ()


class AllPairsSize(NamedTuple):
    """The rows N, columns M and features D of an all-pairs row; `label` names the row's size
    after the op ("clip_lse/large")."""
    n: int
    m: int
    d: int
    label: str = ""


# The CUDA all-pairs ops form their [rows, M] blocks of products in row chunks of this many
# elements (kChunkElements and chunk_rows in csrc/ops/cuda/clip_siglip_kernel.cu).
CUDA_CHUNK_ELEMENTS = 2 ** 24


def cuda_chunk_rows(m: int) -> int:
    """Rows per chunk of the CUDA clip_lse / siglip_loss / row_lse against `m` columns."""
    return max(1, CUDA_CHUNK_ELEMENTS // max(m, 1))


def cuda_chunks(size: AllPairsSize) -> int:
    """The number of row chunks the CUDA all-pairs ops cut `size` into."""
    return -(-size.n // cuda_chunk_rows(size.m))


ALL_PAIRS_SIZE = AllPairsSize(300, 530, 40)  # 2 x 3 of the CPU kernels' 256-tiles; 1 CUDA chunk
# --full on CUDA: 3 row chunks of 1,023 rows (1023, 1023, 54), so the chunk borders run -- each
# chunk's diagonal offset, SigLIP's positives at r0 + offset, the per-chunk row statistics,
# clip_lse's column log-sum-exps merged across chunks, the backward's per-chunk dQ rows and dK
# sums. N x M = 34 M pairs (the float64 reference: 275 MB per N x M tensor, on the device).
ALL_PAIRS_LARGE = AllPairsSize(2100, 16400, 8, "large")
# --quick and the CPU (whose kernels have no such chunks): the same row at a size that runs in
# a fraction of a second (1 CUDA chunk; partial 256-tiles both ways).
ALL_PAIRS_LARGE_QUICK = AllPairsSize(600, 1100, 8, "large")
ALL_PAIRS_SCALARS = dict(scale=20.0, bias=-5.0)  # CLIP's / SigLIP's at initialisation
SIGLIP_OFFSET = 100  # row i's positive is column i + 100
ALL_PAIRS_CASES = {
    "clip_lse": AllPairsCase("clip_lse", ("clip_lse_backward",),
                             ("row_lse", "col_lse", "diag"), (True, True, True), ("scale",)),
    "siglip_loss": AllPairsCase("siglip_loss", ("siglip_loss_backward",), ("loss",), (False,),
                                ("scale", "bias"), kwargs=(("offset", SIGLIP_OFFSET),)),
    # k without a gradient: the backward from the mean saved by the forward.
    "row_lse/k-no-grad": AllPairsCase("row_lse", (), ("lse",), (True,), ("scale",),
                                      k_grad=False),
    # k with one: the forward forms no mean, the backward is clip_lse's.
    "row_lse/k-grad": AllPairsCase("row_lse", ("clip_lse_backward",), ("lse",), (True,),
                                   ("scale",)),
}


def _all_pairs_inputs(dtype: torch.dtype, size: AllPairsSize = ALL_PAIRS_SIZE, seed: int = 7):
    """Unit rows q [N, D] and k [M, D] rounded to `dtype`, k's rows i + SIGLIP_OFFSET close to
    q's rows i (the positives), and the scalars (exact in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda t: torch.nn.functional.normalize(t, dim=1)  # noqa: E731
    q = unit(torch.randn(size.n, size.d, generator=g, dtype=torch.float64))
    k = unit(torch.randn(size.m, size.d, generator=g, dtype=torch.float64))
    noise = torch.randn(size.n, size.d, generator=g, dtype=torch.float64)
    k[SIGLIP_OFFSET:SIGLIP_OFFSET + size.n] = unit(q + 0.5 * noise)
    return dict(q=q.to(dtype), k=k.to(dtype), **ALL_PAIRS_SCALARS)


def _all_pairs_run(case: AllPairsCase, fn, x, device, dtype):
    """fn (the op or its reference) on `device` in `dtype` (the scalars in the statistics'
    dtype); returns the outputs, then the gradients of q, k (where it takes one) and the
    scalars of a sum of the outputs with random weights (the upstream gradients: float32
    values, fixed by each output's shape)."""
    stat = _stat_dtype(dtype)
    q = x["q"].to(device=device, dtype=dtype).requires_grad_()
    k = x["k"].to(device=device, dtype=dtype).requires_grad_(case.k_grad)
    scalars = [torch.tensor(x[name], dtype=stat, device=device).requires_grad_()
               for name in case.scalars]
    outputs = fn(q, k, *scalars, **dict(case.kwargs))
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    g = torch.Generator().manual_seed(8)
    loss = sum((o * torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype)).sum()
               for o in outputs)
    inputs = [q] + ([k] if case.k_grad else []) + scalars
    return outputs + list(torch.autograd.grad(loss, inputs))


def all_pairs_case(device: str, dtype: torch.dtype, name: str,
                   impl: Optional[Callable] = None,
                   size: AllPairsSize = ALL_PAIRS_SIZE) -> Dict:
    """One row: the all-pairs op of ALL_PAIRS_CASES[name] (or `impl`, same signature) on
    `size` against its float64 reference computed on the same device -- every output, and the
    gradients of q, k and the scalars. The shape names the CUDA row chunks `size` spans."""
    from fastiml import reference
    case = ALL_PAIRS_CASES[name]
    op = f"{name}/{size.label}" if size.label else name
    chunks = cuda_chunks(size)
    shape = (f"N={size.n} M={size.m} D={size.d} "
             + " ".join(f"{s}={ALL_PAIRS_SCALARS[s]:g}" for s in case.scalars)
             + "".join(f" {key}={value}" for key, value in case.kwargs)
             + f", {chunks} CUDA chunk{'s' if chunks != 1 else ''}")
    if impl is None:
        reason = _unavailable(case.op, device, case.kernels)
        if reason:
            return _skip(op, device, _dtype_name(dtype), shape, reason)
        impl = _api(case.op)
    start = time.perf_counter()
    half = dtype in HALF_DTYPES
    x = _all_pairs_inputs(dtype, size)
    ref = getattr(reference, case.op)
    try:
        got = _all_pairs_run(case, impl, x, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        exact = _all_pairs_run(case, ref, x, device, torch.float64)
        low = None if half else _all_pairs_run(case, ref, x, device, dtype)
        if len(got) != len(exact):
            raise ValueError(f"{len(got)} outputs and gradients, expected {len(exact)}")
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
        return _error_row(op, device, _dtype_name(dtype), shape, e)
    stat = _stat_dtype(dtype)
    features = ("q", "k") if case.k_grad else ("q",)
    names = case.outputs + tuple(f"grad_{s}" for s in features + case.scalars)
    # Outputs and the scalars' gradients in the statistics' dtype, the features' in theirs.
    dtypes = [stat] * len(case.outputs) + [dtype] * len(features) + [stat] * len(case.scalars)
    log_domain = case.log_domain + (False,) * (len(names) - len(case.outputs))
    # float32 logits |s_ij| <= scale |q| |k| (+ |bias|), sums of M terms per row (as in
    # tests/test_clip.py, test_row_lse.py).
    bias = abs(x["bias"]) if "bias" in case.scalars else 0.0
    span = similarity_span(x["q"], x["k"], 1 / x["scale"]) + bias
    arg_error = float32_arg_error(span, size.m)
    checks = _Checks()
    for i, out in enumerate(names):
        if half:
            checks.half(out, got[i], exact[i], dtypes[i], arg_error, log_domain=log_domain[i])
        else:
            checks.close(out, got[i], exact[i], low[i], dtype)
        checks.dtype(f"{out}.dtype", got[i], dtypes[i])
    return checks.row(op, device, _dtype_name(dtype), shape, time.perf_counter() - start)


# ------------------------------------------------------------------------------ contour ops

MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)


def _mask(dtype: torch.dtype, device: str, seed: int = 1):
    """A 2 x 37 x 45 mask with blob-like regions (so that cells of all three classes occur);
    soft masks hold multiples of 1/8, whose sums are exact in every float dtype. Returns the
    mask and a valid-region mask (zero padding on the right)."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = 2, 37, 45
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    field = torch.zeros(b, h, w)
    for i in range(b):
        for _ in range(3):
            cy, cx = torch.randint(0, h, (1,), generator=g), torch.randint(0, w, (1,), generator=g)
            r = 4 + 6 * torch.rand(1, generator=g)
            field[i] += ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2).float()
    tampered = field > 0
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[:, :, w - 7:] = False
    if dtype == torch.bool:
        mask = tampered
    elif dtype == torch.uint8:
        mask = tampered.to(torch.uint8) * 255
    else:
        soft = torch.randint(0, 9, (b, h, w), generator=g).float() / 8
        mask = torch.where(tampered, torch.clamp(soft + 0.5, max=1.0), soft * 0.25).to(dtype)
    return mask.to(device), valid.to(device)


def contour_mine_case(device: str, dtype: torch.dtype, impl: Optional[Callable] = None) -> Dict:
    from fastiml import reference
    op, shape = "contour_mine", "B=2 H=37 W=45 p=4"
    if impl is None:
        reason = _unavailable("contour_mine", device)
        if reason:
            return _skip(op, device, _dtype_name(dtype), shape, reason)
        impl = _api("contour_mine")
    start = time.perf_counter()
    checks = _Checks()
    try:
        mask, valid = _mask(dtype, device)
        for tag, kw in (("", dict(lo=0.0, hi=1.0)), ("valid,", dict(lo=0.2, hi=0.8))):
            v = valid if tag else None
            frac, klass = impl(mask, 4, valid=v, **kw)
            frac_ref, klass_ref = reference.contour_mine(mask.cpu(), 4, valid=None if v is None
                                                         else v.cpu(), **kw)
            checks.exact(f"{tag}frac", frac, frac_ref)
            checks.exact(f"{tag}klass", klass, klass_ref)
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dtype), shape, e)
    return checks.row(op, device, _dtype_name(dtype), shape, time.perf_counter() - start)


def contour_band_case(device: str, dtype: torch.dtype, impl: Optional[Callable] = None) -> Dict:
    from fastiml import reference
    op, shape = "contour_band", "B=2 H=37 W=45 r=1,3"
    if impl is None:
        reason = _unavailable("contour_band", device)
        if reason:
            return _skip(op, device, _dtype_name(dtype), shape, reason)
        impl = _api("contour_band")
    start = time.perf_counter()
    checks = _Checks()
    try:
        mask, valid = _mask(dtype, device)
        for radius in (1, 3):
            for v in (None, valid):
                band = impl(mask, radius, valid=v)
                want = reference.contour_band(mask.cpu(), radius,
                                              valid=None if v is None else v.cpu())
                checks.exact(f"r={radius}{',valid' if v is not None else ''}", band, want)
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dtype), shape, e)
    return checks.row(op, device, _dtype_name(dtype), shape, time.perf_counter() - start)


# ------------------------------------------------------------------------------ pivot

def _pivot_run(fn, a, b, klass, patch, device, dtype, grad_out):
    a = a.to(device=device, dtype=dtype).requires_grad_()
    b = b.to(device=device, dtype=dtype).requires_grad_()
    loss = fn(a, b, klass.to(device), patch, weight_contour=1.0, weight_other=0.5)
    ga, gb = torch.autograd.grad(loss, [a, b], grad_outputs=torch.full_like(loss, grad_out))
    return loss, ga, gb


def pivot_case(device: str, dtype: torch.dtype, impl: Optional[Callable] = None) -> Dict:
    from fastiml import reference
    op, shape = "pivot_consistency", "B=2 H=37 W=45 p=4"
    if impl is None:
        reason = _unavailable("pivot_consistency", device, ["pivot_consistency_backward"])
        if reason:
            return _skip(op, device, _dtype_name(dtype), shape, reason)
        impl = _api("pivot_consistency")
    start = time.perf_counter()
    checks = _Checks()
    try:
        g = torch.Generator().manual_seed(2)
        a = (3 * torch.randn(2, 1, 37, 45, generator=g, dtype=torch.float64)).to(dtype)
        b = (3 * torch.randn(2, 1, 37, 45, generator=g, dtype=torch.float64)).to(dtype)
        klass = torch.randint(-1, 3, (2, 10, 12), generator=g).to(torch.int8)
        grad_out = 0.75
        got = _pivot_run(impl, a, b, klass, 4, device, dtype, grad_out)
        exact = _pivot_run(reference.pivot_consistency, a, b, klass, 4, "cpu", torch.float64,
                           grad_out)
        half = dtype in HALF_DTYPES
        low = None if half else _pivot_run(reference.pivot_consistency, a, b, klass, 4, device,
                                           dtype, grad_out)
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dtype), shape, e)
    for i, name in enumerate(("loss", "grad_a", "grad_b")):
        if half:  # as tests/test_pivot.py: all relative; float32 adds only the loss's sum
            checks.half(name, got[i], exact[i], dtype if i else torch.float32,
                        float32_arg_error(0.0, a.numel()))
        else:
            checks.close(name, got[i], exact[i], low[i], dtype)
    return checks.row(op, device, _dtype_name(dtype), shape, time.perf_counter() - start)


# ------------------------------------------------------------------------------ --full

def _info_row(op, device, dtype, shape, output, value, target, passed, reason="") -> Dict:
    """A row whose 'max error' column holds a measured value and 'tolerance' its target;
    passed None: no target applies (INFO)."""
    status = "INFO" if passed is None else ("PASS" if passed else "FAIL")
    return dict(op=op, device=device, dtype=dtype, shape=shape, output=output,
                error=float(value), tolerance=math.nan if target is None else float(target),
                status=status, reason=reason, checks=[], seconds=0.0)


def _outputs_of(device: str, dtype: torch.dtype, tiles: Optional[str] = None
                ) -> List[torch.Tensor]:
    """Every op's outputs and gradients on fixed inputs (for the run-to-run comparison and the
    sanitizer); `tiles`: the CUDA tile test hook's value for pair_stats and pair_softplus."""
    from fastiml import ops, reference
    out = []
    for mode in ("general", "self", "groups"):
        x = _pair_inputs(mode, dtype, device)
        q64 = x["q"].double()
        lse = reference.pair_stats(q64, None if x["k"] is None else x["k"].double(),
                                   x["q_label"], x["k_label"], x["q_group"], x["k_group"],
                                   tau=TAU, exclude_self=x["kwargs"]["exclude_self"],
                                   denominator="negatives")[0]
        with forced_tiles(tiles):
            out += [t for t in _pair_run(ops.pair_stats, x, device, dtype) if t is not None]
            out += [t for t in _softplus_run(ops.pair_softplus, x, lse, device, dtype)
                    if t is not None]
    mask, valid = _mask(torch.uint8, device)
    out += list(ops.contour_mine(mask, 4, valid=valid)) + [ops.contour_band(mask, 3, valid=valid)]
    g = torch.Generator().manual_seed(2)
    a = (3 * torch.randn(2, 1, 37, 45, generator=g)).to(dtype)
    b = (3 * torch.randn(2, 1, 37, 45, generator=g)).to(dtype)
    klass = torch.randint(-1, 3, (2, 10, 12), generator=g).to(torch.int8)
    out += list(_pivot_run(ops.pivot_consistency, a, b, klass, 4, device, dtype, 0.75))
    x = _all_pairs_inputs(dtype)
    for case in ALL_PAIRS_CASES.values():
        out += _all_pairs_run(case, getattr(ops, case.op), x, device, dtype)
    return out


# pair_stats modes whose forward and backward must not synchronise with the host on CUDA.
SYNC_MODES = ("self", "groups")


@contextlib.contextmanager
def _sync_warnings(device: str):
    """Records the block's warnings in the yielded list; on CUDA with
    ``torch.cuda.set_sync_debug_mode("warn")``, so that every synchronising call adds one (the
    previous mode is restored after)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(before)


def _sync_count(seen) -> int:
    return sum("synchroniz" in str(w.message) for w in seen)


def sync_case(device: str, mode: str, impl: Optional[Callable] = None) -> Dict:
    """One row: ops.pair_stats (or `impl`, same signature) in `mode`, bfloat16, must not
    synchronise with the host -- neither the forward (with the loss it feeds) nor the backward
    -- counted by ``torch.cuda.set_sync_debug_mode("warn")``. The inputs and the upstream
    weights are on the device before counting starts. A CUDA matter: SKIP elsewhere unless
    `impl` is given (the tests' seeded syncs)."""
    op = f"pair_stats/{mode} (syncs)"
    dtype = torch.bfloat16
    x = _pair_inputs(mode, dtype, device)
    if impl is None:
        reason = ("host synchronisation is a CUDA matter" if device != "cuda" else
                  _unavailable("pair_stats", device, ["pair_stats_backward"]))
        if reason:
            return _skip(op, device, _dtype_name(dtype), x["shape"], reason)
        impl = _api("pair_stats")
    start = time.perf_counter()
    try:
        dev = x["to_dev"]
        q = dev(x["q"]).requires_grad_()
        k = None if x["k"] is None else dev(x["k"]).requires_grad_()
        sets = [dev(x[name]) for name in ("q_label", "k_label", "q_group", "k_group")]
        w_lse, w_pos = dev(x["w_lse"]), dev(x["w_pos"])
        if device == "cuda":
            torch.cuda.synchronize()
        with _sync_warnings(device) as seen:
            lse, pos_mean, _ = impl(q, k, *sets, **x["kwargs"])
            loss = _pair_loss(lse, pos_mean, w_lse, w_pos)
        forward = _sync_count(seen)
        with _sync_warnings(device) as seen:
            torch.autograd.grad(loss, [t for t in (q, k) if t is not None])
        backward = _sync_count(seen)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported as such
        return _error_row(op, device, _dtype_name(dtype), x["shape"], e)
    checks = _Checks()
    for name, count in (("forward syncs", forward), ("backward syncs", backward)):
        checks.items.append(dict(name=name, error=float(count), tolerance=0.0, ok=count == 0,
                                 problem=f"{count} host synchronisation(s)" if count else None))
    return checks.row(op, device, _dtype_name(dtype), x["shape"], time.perf_counter() - start)


def determinism_case(device: str, dtype: torch.dtype, tiles: Optional[str] = None) -> Dict:
    """Two runs of every op, outputs and gradients bit-equal (`tiles`: the CUDA tile test
    hook's value)."""
    op = "two runs bit-equal" + (" (unsplit)" if tiles == "multi" else "")
    shape = "every op"
    try:
        first, second = _outputs_of(device, dtype, tiles), _outputs_of(device, dtype, tiles)
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dtype), shape, e)
    checks = _Checks()
    for i, (a, b) in enumerate(zip(first, second)):
        checks.exact(f"output {i}", a, b)
    return checks.row(op, device, _dtype_name(dtype), shape, 0.0)


def crosscheck_case(dtype: torch.dtype) -> Dict:
    """contour_mine and contour_band: the CUDA outputs equal the CPU ones bit for bit."""
    from fastiml import ops
    op, shape = "CPU vs CUDA contour", "B=2 H=37 W=45"
    checks = _Checks()
    try:
        mask, valid = _mask(dtype, "cpu")
        for v in (None, valid):
            tag = ",valid" if v is not None else ""
            v_cuda = None if v is None else v.cuda()
            for patch in (1, 4, 16):
                cpu = ops.contour_mine(mask, patch, valid=v)
                gpu = ops.contour_mine(mask.cuda(), patch, valid=v_cuda)
                checks.exact(f"frac p={patch}{tag}", gpu[0], cpu[0])
                checks.exact(f"klass p={patch}{tag}", gpu[1], cpu[1])
            for radius in (1, 3, 40):
                checks.exact(f"band r={radius}{tag}", ops.contour_band(mask.cuda(), radius,
                                                                       valid=v_cuda),
                             ops.contour_band(mask, radius, valid=v))
    except Exception as e:  # noqa: BLE001
        return _error_row(op, "cuda", _dtype_name(dtype), shape, e)
    return checks.row(op, "cuda", _dtype_name(dtype), shape, 0.0)


def offsets64_case(device: str = "cuda", d: int = 128, m: int = 64, tail: int = 256) -> Dict:
    """q with N x D > 2^31 elements (bf16): the last rows' statistics and gradients against the
    float64 reference computed on those rows alone (a row depends only on itself and k)."""
    from fastiml import ops, reference
    n = (1 << 31) // d + 4096
    op, shape, dt = "64-bit offsets", f"N={n} M={m} D={d}", torch.bfloat16
    try:
        g = torch.Generator(device=device).manual_seed(3)
        q = torch.randn(n, d, device=device, generator=g, dtype=dt)
        q = torch.nn.functional.normalize(q.float(), dim=1).to(dt).requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=g),
                                          dim=1).to(dt)
        q_label = torch.randint(0, 4, (n,), device=device, generator=g)
        k_label = torch.randint(0, 4, (m,), device=device, generator=g)
        lse, pos_mean, pos_count = ops.pair_stats(q, k, q_label, k_label, tau=TAU)
        keep = torch.isfinite(lse)
        (torch.where(keep, lse, 0.0).sum() + pos_mean.sum()).backward()
        rows = slice(n - tail, n)
        q_tail = q.detach()[rows].double().cpu().requires_grad_()
        r = reference.pair_stats(q_tail, k.double().cpu(), q_label[rows].cpu(), k_label.cpu(),
                                 tau=TAU)
        (torch.where(torch.isfinite(r[0]), r[0], 0.0).sum() + r[1].sum()).backward()
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dt), shape, e)
    checks = _Checks()
    arg_error = float32_arg_error(similarity_span(q_tail, k, TAU), m)
    checks.half("lse (last rows)", lse[rows], r[0], torch.float32, arg_error, log_domain=True)
    checks.half("pos_mean (last rows)", pos_mean[rows], r[1], torch.float32, arg_error,
                log_domain=True)
    checks.half("grad_q (last rows)", q.grad[rows], q_tail.grad, dt, arg_error)
    checks.exact("pos_count (last rows)", pos_count[rows], r[2])
    return checks.row(op, device, _dtype_name(dt), shape, 0.0)


def large_case(device: str, quick: bool = False, chunk: int = 512) -> Dict:
    """pair_stats in bfloat16, general mode, N = M = 2 x SMs x 64 + 40, D = 128, with the
    default schedule: more row tiles than the 2 x SMs work items the CUDA split aims at, so no
    split -- every block walks all ~2 x SMs column tiles (forward, dq and dk), at a size users
    run. Every row against float64, the reference computed in row chunks of `chunk` on the
    device (O(chunk x M) memory). `quick` (and the CPU): 2 "SMs", N = 296."""
    from fastiml import reference
    sms = _sm_count(device) if device == "cuda" and not quick else 2
    n = m = 2 * sms * 64 + 40
    d, dt = 128, torch.bfloat16
    op, shape = "pair_stats/large", f"N={n} M={m} D={d}, default schedule"
    reason = _unavailable("pair_stats", device, ["pair_stats_backward"])
    if reason:
        return _skip(op, device, _dtype_name(dt), shape, reason)
    start = time.perf_counter()
    try:
        g = torch.Generator().manual_seed(6)
        unit = lambda rows: torch.nn.functional.normalize(  # noqa: E731
            torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(dt)
        q, k = unit(n), unit(m)
        q_label = torch.randint(0, 10, (n,), generator=g).to(device)
        k_label = torch.randint(0, 10, (m,), generator=g).to(device)
        w_lse, w_pos = (torch.randn(n, generator=g, dtype=torch.float64).to(dt).to(device)
                        for _ in range(2))
        q_dev = q.to(device, copy=True).requires_grad_()
        k_dev = k.to(device, copy=True).requires_grad_()
        lse, pos_mean, pos_count = _api("pair_stats")(q_dev, k_dev, q_label, k_label, tau=TAU)
        _pair_loss(lse, pos_mean, w_lse, w_pos).backward()
        walks = _tiles_per_block(dict(q_label=q_label, k_label=k_label, q_group=None,
                                      k_group=None, k=k), device, sms)
        k64 = k.double().to(device).requires_grad_()
        exact, grad_q = [[], [], []], []
        for r0 in range(0, n, chunk):
            rows = slice(r0, r0 + chunk)
            q64 = q[rows].double().to(device).requires_grad_()
            stats = reference.pair_stats(q64, k64, q_label[rows], k_label, tau=TAU)
            _pair_loss(stats[0], stats[1], w_lse[rows], w_pos[rows]).backward()
            for part, t in zip(exact, stats):
                part.append(t.detach())
            grad_q.append(q64.grad)
        exact = [torch.cat(part) for part in exact]
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dt), shape, e)
    checks = _Checks()
    arg_error = float32_arg_error(similarity_span(q, k, TAU), m)
    checks.half("lse", lse, exact[0], torch.float32, arg_error, log_domain=True)
    checks.half("pos_mean", pos_mean, exact[1], torch.float32, arg_error, log_domain=True)
    checks.exact("pos_count", pos_count, exact[2])
    checks.half("grad_q", q_dev.grad, torch.cat(grad_q), dt, arg_error)
    checks.half("grad_k", k_dev.grad, k64.grad, dt, arg_error)
    _check_walks(checks, walks, None)
    return checks.row(op, device, _dtype_name(dt), shape, time.perf_counter() - start)


def sanitizer_workload() -> None:
    """Small CUDA calls of every op, forward and backward (run under compute-sanitizer): in
    every dtype with multi-tile blocks (the tile test hook), and in float32 and bfloat16 with
    the default schedule (single-tile items, the split merge kernels)."""
    for dtype in FULL_DTYPES:
        _outputs_of("cuda", dtype, "multi")
    for dtype in (torch.float32, torch.bfloat16):
        _outputs_of("cuda", dtype)
    torch.cuda.synchronize()


SANITIZER_TIMEOUT_S = 240.0


def sanitizer_case(tool: str, timeout: float = SANITIZER_TIMEOUT_S) -> Dict:
    op, shape = f"compute-sanitizer {tool}", "small calls, every op"
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return _skip(op, "cuda", "*", shape, "compute-sanitizer is not on PATH")
    cmd = [exe, "--tool", tool, "--error-exitcode", "9", sys.executable, "-c",
           "from fastiml import selftest; selftest.sanitizer_workload()"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    except subprocess.TimeoutExpired:
        return _info_row(op, "cuda", "*", shape, "errors", math.nan, 0, False,
                         f"timed out after {timeout:.0f} s")
    summary = [line for line in proc.stdout.splitlines() if "ERROR SUMMARY" in line]
    errors = 0.0 if proc.returncode == 0 else math.inf
    reason = "" if proc.returncode == 0 else (
        (summary[-1] if summary else (proc.stderr.strip().splitlines() or ["exit"])[-1])[:160])
    return _info_row(op, "cuda", "*", shape, "errors", errors, 0, proc.returncode == 0, reason)


def _time(fn, device: str, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# The README's bound of pair_stats bf16 N = M = 65,536, D = 128 forward + backward on one
# H100/H200 (tensor-core time, perfect overlap); the target is twice that.
PAIR_BOUND_S = 5.6e-3
MPC_BATCH_RATIO_TARGET = 4.5


def pair_timing_case(device: str, quick: bool) -> Dict:
    from fastiml import ops
    n, d = (2048, 128) if quick or device != "cuda" else (65536, 128)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    op, shape = "time pair_stats fwd+bwd", f"self N={n} D={d}"
    try:
        g = torch.Generator().manual_seed(4)
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        x = x.to(device=device, dtype=dt).requires_grad_()
        labels = torch.randint(0, 10, (n,), generator=g).to(device)

        def step():
            x.grad = None
            lse, pos_mean, _ = ops.pair_stats(x, None, labels, None, tau=TAU, exclude_self=True)
            (torch.where(torch.isfinite(lse), lse, 0.0) - pos_mean).sum().backward()
        seconds = _time(step, device)
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, _dtype_name(dt), shape, e)
    target = 2 * PAIR_BOUND_S if n == 65536 else None
    return _info_row(op, device, _dtype_name(dt), shape, "seconds", seconds, target,
                     None if target is None else seconds <= target,
                     "" if target is None else f"2x the README bound ({PAIR_BOUND_S * 1e3:.1f} ms)")


def mpc_timing_case(device: str, quick: bool) -> Dict:
    from fastiml.losses import MPCLoss
    size, dim, small, large = (64, 32, 1, 4) if quick or device != "cuda" else (512, 256, 4, 16)
    op, shape = "time MPCLoss batch ratio", f"B={large} vs {small}, {size}^2, C={dim}"
    try:
        def inputs(batch):
            g = torch.Generator().manual_seed(5)
            feats = lambda: [torch.randn(batch, dim, -(-size // s), -(-size // s),  # noqa: E731
                                         generator=g).to(device).requires_grad_()
                             for s in (4, 8, 16, 32)]
            coarse = torch.rand(batch, 1, 8, 8, generator=g)
            mask = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
            return feats(), feats(), (mask[:, 0] > 0.6).to(torch.uint8).to(device)

        loss_fn = MPCLoss(max_pixels=None)

        def timed(batch):
            fa, fb, mask = inputs(batch)

            def step():
                for t in fa + fb:
                    t.grad = None
                loss_fn(fa, fb, mask)[0].backward()
            return _time(step, device)
        ratio = timed(large) / timed(small)
    except Exception as e:  # noqa: BLE001
        return _error_row(op, device, "float32", shape, e)
    full = large / small == 4 and size == 512
    return _info_row(op, device, "float32", shape, "time ratio", ratio,
                     MPC_BATCH_RATIO_TARGET if full else None,
                     ratio <= MPC_BATCH_RATIO_TARGET if full else None,
                     "linear cost in batch size would be 4.0" if full else "")


def full_rows(device: str, quick: bool,
              sanitizer_timeout: float = SANITIZER_TIMEOUT_S) -> List[Dict]:
    """The --full checks of one device (see the module docstring)."""
    rows = []
    dtypes = (torch.float32, torch.float64) if quick else FULL_DTYPES
    for dtype in dtypes:
        for mode in SWEEP_MODES:
            rows.append(pair_stats_case(device, dtype, mode))
    # Multi-tile blocks: at these sizes the CUDA default splits every list into single tiles.
    for tiles in (None, "multi") if device == "cuda" else (None,):
        for mode in TWO_GROUP_MODES:
            rows.append(pair_stats_case(device, torch.float16, mode, tiles=tiles))
    if device == "cuda":
        for dtype in FULL_DTYPES:
            for mode in PAIR_MODES:
                rows.append(pair_stats_case(device, dtype, mode, tiles="multi"))
            for mode in SOFTPLUS_MODES:
                rows.append(pair_softplus_case(device, dtype, mode, tiles="multi"))
        # TF32 on (torch.backends.cuda.matmul.allow_tf32): pair_softplus must keep full float32.
        for mode in SOFTPLUS_MODES:
            rows.append(pair_softplus_case(device, torch.float32, mode, tf32=True))
    rows.append(large_case(device, quick))
    # The all-pairs ops across the CUDA kernels' row-chunk borders (one chunk at --quick sizes).
    size = ALL_PAIRS_LARGE if device == "cuda" and not quick else ALL_PAIRS_LARGE_QUICK
    rows += [all_pairs_case(device, torch.float32, name, size=size) for name in ALL_PAIRS_CASES]
    for dtype in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)):
        rows.append(determinism_case(device, dtype))
        if device == "cuda":
            rows.append(determinism_case(device, dtype, tiles="multi"))
    if device == "cuda":
        if not quick:
            rows.append(offsets64_case(device))
        for dtype in MASK_DTYPES:
            rows.append(crosscheck_case(dtype))
        for tool in ("memcheck", "racecheck", "synccheck"):
            rows.append(sanitizer_case(tool, sanitizer_timeout))
        for mode in SYNC_MODES:
            rows.append(sync_case(device, mode))
    rows.append(pair_timing_case(device, quick))
    rows.append(mpc_timing_case(device, quick))
    return rows


# ------------------------------------------------------------------------------ driver

def available_devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _format(rows: Sequence[Dict]) -> str:
    header = ("op", "device", "dtype", "shape", "max error", "tolerance", "result")
    lines = []
    for r in rows:
        err = "-" if math.isnan(r["error"]) else f"{r['error']:.3g}"
        tol = "-" if math.isnan(r["tolerance"]) else f"{r['tolerance']:.3g}"
        if r["output"] and r["status"] != "SKIP":
            err = f"{err} ({r['output']})"
        result = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append((r["op"], r["device"], r["dtype"], r["shape"], err, tol, result))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    return "\n".join(out)


def run(devices: Optional[Sequence[str]] = None, verbose: bool = True, full: bool = False,
        quick: bool = False, sanitizer_timeout: float = SANITIZER_TIMEOUT_S) -> List[Dict]:
    """Runs every op on every device and dtype; returns one dict per check row. ``full`` adds
    the --full checks, ``quick`` runs them at small sizes; ``sanitizer_timeout``: seconds for
    each compute-sanitizer run.

    Each row has ``op, device, dtype, shape, output`` (the worst output of the row), ``error``,
    ``tolerance``, ``status`` ("PASS", "FAIL" or "SKIP"), ``reason`` and the per-output
    ``checks``. With ``verbose`` the table is printed.
    """
    if devices is None:
        devices = available_devices()
    rows: List[Dict] = []
    try:
        from fastiml import ops
    except ImportError as e:
        rows.append(dict(op="import fastiml.ops", device="-", dtype="-", shape="-", output="",
                         error=math.inf, tolerance=math.nan, status="FAIL", reason=str(e),
                         checks=[], seconds=0.0))
        if verbose:
            print(_format(rows))
        return rows
    for device in devices:
        if device not in _DISPATCH_KEYS:
            raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")
        if device == "cuda" and not torch.cuda.is_available():
            rows.append(_skip("*", device, "*", "-", "torch.cuda.is_available() is False"))
            continue
        if device == "cuda" and not ops.compiled_with_cuda():
            rows.append(_skip("*", device, "*", "-",
                              "fastiml._C was built without its CUDA kernels (rebuild with "
                              "FASTIML_CUDA=1 where nvcc is found)"))
            continue
        for dtype in DTYPES:
            for mode in PAIR_MODES:
                rows.append(pair_stats_case(device, dtype, mode))
            for mode in SOFTPLUS_MODES:
                rows.append(pair_softplus_case(device, dtype, mode))
        for dtype in MASK_DTYPES:
            rows.append(contour_mine_case(device, dtype))
            rows.append(contour_band_case(device, dtype))
        for dtype in DTYPES:
            rows.append(pivot_case(device, dtype))
            rows += [all_pairs_case(device, dtype, name) for name in ALL_PAIRS_CASES]
        if full or quick:
            rows += full_rows(device, quick, sanitizer_timeout)
    if verbose:
        print(_format(rows))
        counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP", "INFO")}
        print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped, "
              f"{counts['INFO']} timings without a target "
              f"(torch {torch.__version__}, devices: {', '.join(devices)}, "
              f"CPU kernels: {ops.cpu_capability()}"
              + (f", GPU: {torch.cuda.get_device_name()}" if "cuda" in devices
                 and torch.cuda.is_available() else "") + ")")
    return rows


def _json_safe(x):
    """A copy that strict JSON parsers accept: NaN -> None, +-inf -> "inf" / "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastiml selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append", choices=sorted(_DISPATCH_KEYS),
                        help="device to test (repeatable; default: cpu and, if present, cuda)")
    parser.add_argument("--full", action="store_true",
                        help="the one-shot GPU verification: shape sweep, 64-bit offsets, CPU vs "
                             "CUDA, two runs bit-equal, compute-sanitizer, timings")
    parser.add_argument("--quick", action="store_true",
                        help="the --full checks at small sizes (implies --full)")
    parser.add_argument("--quiet", action="store_true", help="print only failures")
    parser.add_argument("--sanitizer-timeout", type=float, default=SANITIZER_TIMEOUT_S,
                        metavar="SECONDS",
                        help="time limit of each compute-sanitizer run (--full on CUDA; "
                             f"default {SANITIZER_TIMEOUT_S:.0f})")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the rows to PATH as JSON (NaN -> null, +-inf -> "
                             "\"inf\" / \"-inf\")")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `fastiml selftest -- --device cuda` passes the separator on
        argv = argv[1:]
    args = parser.parse_args(argv)
    if not args.sanitizer_timeout > 0:
        parser.error(f"--sanitizer-timeout must be > 0 seconds, got {args.sanitizer_timeout}")
    rows = run(devices=args.device, verbose=not args.quiet, full=args.full, quick=args.quick,
               sanitizer_timeout=args.sanitizer_timeout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(rows), f, indent=1)
    failed = [r for r in rows if r["status"] == "FAIL"]
    if args.quiet and failed:
        print(_format(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
