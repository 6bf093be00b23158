"""Pivot-consistent loss, forward + backward: fused ``pivot_consistency`` against autograd
through the plain-PyTorch reference (DESIGN 2.3, 8).

Input: two B x 1 x H x W logit maps (default 8 x 1 x 512 x 512) that require grad, and the
klass grid that ``contour_mine`` gives at patch p = 16 for random-blob masks of the same size
(weight_contour = 1, weight_other = 0: NCL's setting). Providers, each in its own subprocess:

* ``fused``      ``fastiml.ops.pivot_consistency`` (reads klass by index; closed-form backward).
* ``plain``      what a careful user writes: ``repeat_interleave`` of the classes into a weight
                 map, the closed-form terms ``(sigmoid(a) - sigmoid(b)) * (a - b)``, autograd.
* ``reference``  ``fastiml.reference.pivot_consistency`` (upsampled klass, log-sigmoid KL terms,
                 autograd), computed in the input dtype.
* ``clone``      ``a.clone(); b.clone()``: the memory-bandwidth yardstick. Bytes/s are reported
                 for it (4 bytes-per-element passes) and for ``fused`` (6: forward reads a, b;
                 backward reads them again and writes both gradients).

The bandwidth floor: the fused case also times copying a and b into buffers allocated once
(4 passes: memory traffic alone) in its own process, right after itself; the floor is its 6
passes at that rate, and ``× floor = fused / (6/4 · copy)``. The clone floor: the same at the
rate of ``a.clone(); b.clone()`` (fresh allocations, as the op's gradients), each clone timed
right after a step of the op, and ``× clone floor`` the median of those pairs'
``step / (6/4 · clone)``: the two see the same allocator mode (fresh pages or reused ones).

    python -m benchmarks.bench_pivot [--dtypes float32 bfloat16] [--batch 8] [--size 512]
        [--patch 16] [--repeat 5] [--json out.json] [--max-gb 12]
"""
import statistics
import sys
from typing import List, Tuple

import torch

from benchmarks import harness as H
from benchmarks.bench_contour import make_masks

BENCHMARK = "pivot"
MODULE = "benchmarks.bench_pivot"
PROVIDERS = ("fused", "plain", "reference", "clone")

# Rough peak bytes per logit pixel (memory guard only): the reference keeps about a dozen
# float32 maps for autograd.
_BYTES_PER_PIXEL = {"fused": 12.0, "plain": 48.0, "reference": 160.0, "clone": 8.0}
# Passes over one logit map (element-size units) that each provider must make, for bytes/s.
_PASSES = {"fused": 6, "clone": 4}


def estimate_bytes(provider: str, pixels: int) -> float:
    return (16.0 + _BYTES_PER_PIXEL[provider]) * pixels


def make_inputs(batch: int, size: int, patch: int, dtype: torch.dtype, device, seed: int = 0):
    """Logits a, b [batch, 1, size, size] (leaves requiring grad) and klass from contour_mine."""
    from fastiml import ops
    g = torch.Generator().manual_seed(seed)
    a = (3 * torch.randn(batch, 1, size, size, generator=g)).to(device=device, dtype=dtype)
    b = (a.float() + torch.randn(batch, 1, size, size, generator=g).to(device)).to(dtype)
    _, klass = ops.contour_mine(make_masks(batch, size, device, seed=seed), patch)
    return a.requires_grad_(), b.requires_grad_(), klass


def plain_pivot(a, b, klass, patch: int, weight_contour: float = 1.0, weight_other: float = 0.0):
    """The plain-PyTorch formulation: upsampled weight map, closed-form terms, autograd."""
    h, w = a.shape[-2:]
    up = klass.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None, :h, :w]
    weight = torch.where(up == 2, weight_contour,
                         torch.where(up == -1, 0.0, weight_other)).to(a.dtype)
    terms = (torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)
    return (weight * terms).sum() / weight.sum()


def loss_fn_of(provider: str):
    from fastiml import ops, reference
    if provider == "fused":
        return ops.pivot_consistency
    if provider == "plain":
        return plain_pivot
    if provider == "reference":
        return reference.pivot_consistency
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def run_case(case: dict) -> dict:
    """One provider, forward + backward: time, peak memory above the inputs, loss value."""
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    patch = int(case.get("patch", 16))
    a, b, klass = make_inputs(int(case["batch"]), int(case["size"]), patch,
                              H.dtype_of(case.get("dtype", "float32")), device)
    last = {}
    if case["provider"] == "clone":
        a0, b0 = a.detach(), b.detach()

        def step():
            last["copies"] = (a0.clone(), b0.clone())
            last["loss"] = torch.zeros(())
    else:
        loss_of = loss_fn_of(case["provider"])

        def step():
            a.grad = b.grad = None
            loss = loss_of(a, b, klass, patch)
            loss.backward()
            last["loss"] = loss.detach()

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 5)), device=device)
    out = {**timing, **meter.stop(), "loss": float(last["loss"]), "threads": threads}
    if case["provider"] == "fused":  # the bandwidth floor, timed in this process
        a0, b0 = a.detach(), b.detach()
        a1, b1 = torch.empty_like(a0), torch.empty_like(b0)
        # Copies into buffers allocated once: memory traffic alone. (A timed clone() also pays
        # for fresh pages whenever the allocator returns its blocks to the OS.)
        copy = H.time_fn(lambda: (a1.copy_(a0), b1.copy_(b0)), repeat=int(case.get("repeat", 5)),
                         device=device)
        out["floor_s"] = _PASSES["fused"] / _PASSES["clone"] * copy["time_s"]
        # The same traffic at the rate of clone() -- which, like the op's own gradients, writes
        # into fresh allocations -- timed in pairs with the op: a process's allocator can move
        # between returning freed blocks to the OS (fresh pages, several times slower) and
        # reusing them, and a step and the clone timed side by side see the same mode. The
        # ratio is the median of the pairs' ratios.
        pairs = _paired_times(step, lambda: (a0.clone(), b0.clone()),
                              int(case.get("repeat", 5)), device)
        scale = _PASSES["fused"] / _PASSES["clone"]
        out["clone_floor_s"] = scale * statistics.median(c for _, c in pairs)
        out["clone_floor_ratio"] = statistics.median(f / (scale * c) for f, c in pairs)
    return out


def _paired_times(first, second, repeat: int, device) -> List[Tuple[float, float]]:
    """(time of first(), time of second()) for `repeat` pairs run back to back, after one
    untimed pair."""
    device = torch.device(device)
    H.time_fn(lambda: (first(), second()), repeat=0, device=device)
    return [(H.time_fn(first, repeat=0, device=device)["time_s"],
             H.time_fn(second, repeat=0, device=device)["time_s"]) for _ in range(repeat)]


# -------------------------------------------------------------------------------- the run

def run(args) -> List[H.Result]:
    results = []
    pixels = args.batch * args.size * args.size
    for dtype_name in args.dtypes:
        for provider in PROVIDERS:
            params = {"B": args.batch, "H": args.size, "W": args.size, "patch": args.patch,
                      "dtype": dtype_name, "device": args.device}
            status = H.memory_guard(estimate_bytes(provider, pixels), args.max_gb)
            if status is not None:
                results.append(H.Result(BENCHMARK, provider, params, status))
                continue
            case = {"provider": provider, "batch": args.batch, "size": args.size,
                    "patch": args.patch, "dtype": dtype_name, "device": args.device,
                    "threads": args.threads, "repeat": args.repeat}
            H.progress(f"[pivot] {dtype_name} {provider} ...")
            out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
            r = H.result_from_child(BENCHMARK, provider, params, out,
                                    keep=("loss", "floor_s", "clone_floor_s", "clone_floor_ratio"))
            H.progress(f"[pivot] {dtype_name} {provider}: {H.fmt_seconds(r)} s, "
                       f"{H.fmt_mb(r)} MB above inputs")
            results.append(r)
    _derive(results)
    return results


def _derive(results):
    for r in results:
        if r.provider in _PASSES and r.ok:
            p = r.params
            bytes_moved = _PASSES[r.provider] * p["B"] * p["H"] * p["W"] * H.dtype_of(
                p["dtype"]).itemsize
            r.metrics["gbytes_per_s"] = bytes_moved / r.metrics["time_s"] / 1e9
    for fused in [r for r in results if r.provider == "fused" and r.ok]:
        if fused.metrics.get("floor_s"):
            fused.metrics["bandwidth_floor_ratio"] = (fused.metrics["time_s"]
                                                      / fused.metrics["floor_s"])
        for base in ("plain", "reference"):
            s = H.ratio(H.find_result(results, base, dtype=fused.params["dtype"]), fused)
            if s is not None:
                fused.metrics[f"speedup_vs_{base}"] = s
        ref = H.find_result(results, "reference", dtype=fused.params["dtype"])
        if ref is not None and ref.ok:
            x = fused.metrics["loss"]
            fused.metrics["loss_rel_diff_vs_reference"] = abs(ref.metrics["loss"] - x) / max(
                abs(x), 1e-12)


def table(results: List[H.Result]) -> str:
    headers = ["B×1×H×W", "patch", "dtype", "fused s", "plain s", "reference s",
               "speed-up vs plain", "vs reference", "fused GB/s", "clone GB/s", "floor s",
               "× floor", "× clone floor",
               "peak MB above inputs: fused", "plain", "reference", "loss rel. diff"]
    rows = []
    dtypes = []
    for r in results:
        if r.params["dtype"] not in dtypes:
            dtypes.append(r.params["dtype"])
    for dt in dtypes:
        f, pl, ref, cl = (H.find_result(results, p, dtype=dt) for p in PROVIDERS)
        any_r = f or pl or ref or cl
        diff = f.get("loss_rel_diff_vs_reference") if f is not None else None
        gbs = lambda r: "—" if r is None or r.get("gbytes_per_s") is None else (  # noqa: E731
            f"{r.get('gbytes_per_s'):.1f}")
        rows.append([f"{any_r.params['B']}×1×{any_r.params['H']}×{any_r.params['W']}",
                     any_r.params["patch"], dt, H.fmt_seconds(f), H.fmt_seconds(pl),
                     H.fmt_seconds(ref), H.fmt_ratio(H.ratio(pl, f)),
                     H.fmt_ratio(H.ratio(ref, f)), gbs(f), gbs(cl),
                     "—" if f is None or f.get("floor_s") is None else f"{f.get('floor_s'):.4f}",
                     "—" if f is None or f.get("bandwidth_floor_ratio") is None
                     else f"{f.get('bandwidth_floor_ratio'):.2f}×",
                     "—" if f is None or f.get("clone_floor_ratio") is None
                     else f"{f.get('clone_floor_ratio'):.2f}×",
                     H.fmt_mb(f), H.fmt_mb(pl),
                     H.fmt_mb(ref), "—" if diff is None else f"{diff:.1e}"])
    return H.markdown_table(headers, rows) + (
        "\n\nGB/s: bytes the op must move (fused: 6 passes over a logit map -- a, b read twice, "
        "two gradients written; clone: 4) per second. floor: those 6 passes at the rate of "
        "copying a and b into preallocated buffers, timed in the fused case's process; "
        "× floor = fused / floor; × clone floor: the median over pairs of a step and "
        "a.clone(), b.clone() timed right after it (fresh allocations, as the op's "
        "gradients) of step / (6/4 · clone).")


def parser():
    p = H.base_parser(__doc__, repeat=5)
    H.add_dtypes_option(p, default=("float32", "bfloat16"), what="the logits")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="H = W of the logits (default 512)")
    p.add_argument("--patch", type=int, default=16, help="klass grid cell (default 16)")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
