"""SupCon forward + backward: fused ``pair_stats`` against the O(N^2) baselines (DESIGN 8).

Setting: N pixel embeddings, D = 128, L2-normalised, 10 labels, self-contrast (q = k) with the
pair (i, i) excluded, tau = 0.1; loss = mean over rows with a positive of (lse - pos_mean) --
the SupCon loss -- then ``backward()``. Providers, each in its own subprocess:

* ``fused``        ``fastiml.ops.pair_stats(q, None, ...)``: tiles, never an N x N matrix.
* ``naive``        ``fastiml.reference.pair_stats`` (materialised similarity matrix, autograd).
* ``supcontrast``  ``fastiml.reference.supcontrast_loss`` (the SupContrast reference loss,
                   features [N, 1, D], temperature = base_temperature = 0.1).
* ``pml``          pytorch-metric-learning's ``SupConLoss(temperature=0.1)`` (skipped if the
                   package is not installed).

``--modes general`` also runs general mode (k a second feature set of N rows with its own
labels, both requiring grad; fused and naive only).

All four compute the same loss value (reported as a check). The GEMM floor: ``torch.mm`` of
(N x D) @ (D x N), timed in the fused case's process; ``roofline = fused / (4 * mm)`` (one
product forward, three backward). The GEMM-rate roofline: the products the kernel must do
(self mode 2.0 -- forward 1/2 on upper-triangular tiles, backward 3/2: S again, then
(G + G^T) X; general mode 4.0 -- forward 1, backward 3) at the FLOP rate of a 2048^3
``torch.mm`` timed in the same process; ``gemm roofline = fused / that floor``. On the CPU the kernel converts tiles to float32 before its
GEMM (DESIGN 3), so the floor is the float32 product for every input dtype (timed once per N);
on CUDA it is the product in the input dtype.

    python -m benchmarks.bench_pair_stats [--sizes 4096 16384] [--dtypes float32 bfloat16]
        [--large] [--repeat 3] [--json out.json] [--max-gb 12] [--max-baseline-s 90]
"""
import importlib.util
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks import harness as H

BENCHMARK = "pair_stats"
MODULE = "benchmarks.bench_pair_stats"
PROVIDERS = ("fused", "naive", "supcontrast", "pml")
BASELINES = ("naive", "supcontrast", "pml")
LABELS = {"naive": "naive", "supcontrast": "SupContrast", "pml": "pml"}
DEFAULT_SIZES = (4096, 16384, 65536)
LARGE_SIZE = 131072
D, N_LABELS, TAU = 128, 10, 0.1
MODES = ("self", "general")
# N x D . D x N products of work per forward + backward, per mode (see the docstring).
PRODUCTS = {"self": 2.0, "general": 4.0}
GEMM_SIDE = 2048

# Peak bytes above the inputs per (i, j) pair for the O(N^2) baselines (forward + backward),
# measured with this harness at N = 4096 (torch 2.14, CPU) and rounded up; SupContrast's float32
# figure is DESIGN 8's 8.2 GB at N = 16384. Used only by the memory guard.
_BYTES_PER_PAIR = {
    ("naive", 4): 24.0, ("naive", 2): 16.0,
    ("supcontrast", 4): 31.0, ("supcontrast", 2): 17.0,
    ("pml", 4): 50.0, ("pml", 2): 33.0,
}


def pml_available() -> bool:
    return importlib.util.find_spec("pytorch_metric_learning") is not None


def estimate_bytes(provider: str, n: int, dtype: torch.dtype, d: int = D) -> float:
    """Rough peak memory of one provider at size n (inputs included)."""
    esize = torch.empty((), dtype=dtype).element_size()
    inputs = 3.0 * n * d * esize + 16.0 * n
    if provider == "fused":
        return inputs + 4.0 * n * d * 4 + 64e6  # float32 gradient accumulators, tiles
    per_pair = _BYTES_PER_PAIR.get((provider, esize), _BYTES_PER_PAIR[(provider, 4)] * esize / 4)
    return inputs + per_pair * float(n) * float(n)


# ------------------------------------------------------------------------------- providers

def _fused_loss(feat, labels, k=None, k_labels=None):
    from fastiml import ops
    lse, pos_mean, pos_count = ops.pair_stats(feat, k, labels, k_labels, tau=TAU,
                                              exclude_self=k is None)
    keep = pos_count > 0
    return torch.where(keep, lse - pos_mean, 0.0).sum() / keep.sum().clamp(min=1)


def _naive_loss(feat, labels, k=None, k_labels=None):
    from fastiml import reference
    lse, pos_mean, pos_count = reference.pair_stats(feat, k, labels, k_labels, tau=TAU,
                                                    exclude_self=k is None)
    keep = pos_count > 0
    return torch.where(keep, lse - pos_mean, 0.0).sum() / keep.sum().clamp(min=1)


def _supcontrast_loss(feat, labels):
    from fastiml import reference
    return reference.supcontrast_loss(feat[:, None, :], labels, temperature=TAU,
                                      base_temperature=TAU)


def _make_pml_loss():
    from pytorch_metric_learning.losses import SupConLoss
    loss_fn = SupConLoss(temperature=TAU)
    return lambda feat, labels: loss_fn(feat, labels)


def loss_fn_of(provider: str):
    if provider == "fused":
        return _fused_loss
    if provider == "naive":
        return _naive_loss
    if provider == "supcontrast":
        return _supcontrast_loss
    if provider == "pml":
        return _make_pml_loss()
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_inputs(n: int, dtype: torch.dtype, device, d: int = D, seed: int = 0):
    """L2-normalised features [n, d] (a leaf that requires grad) and labels in [0, 10)."""
    g = torch.Generator().manual_seed(seed)
    feat = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, N_LABELS, (n,), generator=g)
    feat = feat.to(device=device, dtype=dtype).requires_grad_()
    return feat, labels.to(device)


def run_case(case: dict) -> dict:
    """One provider, forward + backward, at one size: time, peak memory above the inputs,
    the loss value, and (``time_mm``: a dtype name) the time of the matching ``torch.mm``,
    (``gemm_rate``: a dtype name) the FLOP rate of a 2048^3 ``torch.mm``."""
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    n, d = int(case["n"]), int(case.get("d", D))
    dtype = H.dtype_of(case.get("dtype", "float32"))
    loss_of = loss_fn_of(case["provider"])
    feat, labels = make_inputs(n, dtype, device, d)
    general = case.get("mode", "self") == "general"
    if general and case["provider"] not in ("fused", "naive"):
        raise ValueError(f"{case['provider']} has no general mode")
    k, k_labels = make_inputs(n, dtype, device, d, seed=1) if general else (None, None)
    last = {}

    def step():
        feat.grad = None
        if general:
            k.grad = None
            loss = loss_of(feat, labels, k, k_labels)
        else:
            loss = loss_of(feat, labels)
        loss.backward()
        last["loss"] = loss.detach()

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 3)), device=device,
                       slow_s=float(case.get("slow_s", 5.0)))
    out = {**timing, **meter.stop(), "loss": float(last["loss"]), "threads": threads}
    if case.get("time_mm"):
        del feat, labels, k, k_labels
        mm = H.time_mm(n, d, H.dtype_of(case["time_mm"]), device,
                       repeat=int(case.get("repeat", 3)), slow_s=float(case.get("slow_s", 5.0)))
        out["mm_s"] = mm["time_s"]
    if case.get("gemm_rate"):
        out["gemm_gflops"] = gemm_gflops(H.dtype_of(case["gemm_rate"]), device)
    return out


def gemm_gflops(dtype: torch.dtype, device, side: int = GEMM_SIDE) -> float:
    """FLOP rate (GFLOP/s) of a compute-bound ``torch.mm`` (side^3) in this process."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(side, side, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(side, side, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(side, side, dtype=dtype, device=device)
    t = H.time_fn(lambda: torch.mm(a, b, out=out), repeat=3, device=device)["time_s"]
    return 2.0 * side ** 3 / t / 1e9


# -------------------------------------------------------------------------------- the run

def run(args) -> List[H.Result]:
    providers = [p for p in PROVIDERS if p in args.providers]
    sizes = sorted(set(args.sizes) | ({LARGE_SIZE} if args.large else set()))
    guard = H.TimeGuard(args.max_baseline_s)
    results: List[H.Result] = []
    mm_cache: Dict[int, float] = {}
    for n, mode, dtype_name, provider in (
            (n, mode, dt, pr) for n in sizes for mode in args.modes for dt in args.dtypes
            for pr in providers):
        dtype = H.dtype_of(dtype_name)
        params = {"N": n, "D": D, "dtype": dtype_name, "device": args.device,
                  "threads": args.threads or os.cpu_count(), "labels": N_LABELS,
                  "tau": TAU, "mode": mode}
        status = None
        if mode == "general" and provider not in ("fused", "naive"):
            continue
        if provider == "pml" and not pml_available():
            status = "skipped (pytorch-metric-learning not installed)"
        if status is None:
            status = H.memory_guard(estimate_bytes(provider, n, dtype), args.max_gb)
        if status is None and provider != "fused":
            status = guard.check((provider, dtype_name), n)
        if status is not None:
            H.progress(f"[pair_stats] N={n} {dtype_name} {provider}: {status}")
            results.append(H.Result(BENCHMARK, provider, params, status))
            continue
        case = {"provider": provider, "n": n, "d": D, "dtype": dtype_name,
                "device": args.device, "threads": args.threads, "repeat": args.repeat,
                "mode": mode}
        mm_dtype = dtype_name if args.device == "cuda" else "float32"
        if provider == "fused" and args.roofline:
            case["gemm_rate"] = mm_dtype  # the GEMM rate, in every fused case's process
            if args.device == "cuda" or n not in mm_cache:
                case["time_mm"] = mm_dtype
        H.progress(f"[pair_stats] N={n} {mode} {dtype_name} {provider} ...")
        out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
        r = H.result_from_child(BENCHMARK, provider, params, out,
                                keep=("loss", "mm_s", "gemm_gflops"))
        if r.ok and "mm_s" in r.metrics and args.device != "cuda":
            mm_cache[n] = r.metrics["mm_s"]
        if r.ok and provider == "fused" and "mm_s" not in r.metrics and n in mm_cache:
            r.metrics["mm_s"] = mm_cache[n]  # the float32 floor, timed for this N
        if r.ok and provider != "fused":
            guard.record((provider, dtype_name), n, r.metrics["time_s"])
        H.progress(f"[pair_stats] N={n} {dtype_name} {provider}: "
                   f"{H.fmt_seconds(r)} s, {H.fmt_mb(r)} MB above inputs")
        results.append(r)
    _derive(results)
    return results


def _find(results, provider, n, dtype_name, mode="self") -> Optional[H.Result]:
    for r in results:
        if (r.provider == provider and r.params["N"] == n and r.params["dtype"] == dtype_name
                and r.params.get("mode", "self") == mode):
            return r
    return None


def _derive(results: List[H.Result]) -> None:
    """Adds speed-ups, the roofline ratio and the loss check to the fused results."""
    for fused in [r for r in results if r.provider == "fused" and r.ok]:
        n, dt, mode = fused.params["N"], fused.params["dtype"], fused.params.get("mode", "self")
        for b in BASELINES:
            base = _find(results, b, n, dt, mode)
            s = H.ratio(base, fused)
            if s is not None:
                fused.metrics[f"speedup_vs_{b}"] = s
            if base is not None and base.ok and "loss" in base.metrics:
                ref = fused.metrics["loss"]
                fused.metrics[f"loss_rel_diff_vs_{b}"] = abs(base.metrics["loss"] - ref) / max(
                    abs(ref), 1e-12)
        if "mm_s" in fused.metrics and fused.metrics["mm_s"] > 0:
            fused.metrics["roofline"] = fused.metrics["time_s"] / (4.0 * fused.metrics["mm_s"])
        if fused.metrics.get("gemm_gflops", 0) > 0:
            work = PRODUCTS[mode] * 2.0 * n * n * fused.params["D"]
            floor_s = work / (fused.metrics["gemm_gflops"] * 1e9)
            fused.metrics["gemm_roofline"] = fused.metrics["time_s"] / floor_s


def table(results: List[H.Result], providers=PROVIDERS) -> str:
    baselines = [b for b in BASELINES if b in providers]
    headers = ["N", "mode", "dtype", "fused s"] + [f"{LABELS[b]} s" for b in baselines]
    headers += [f"speed-up vs {LABELS[b]}" for b in baselines]
    headers += ["mm s", "roofline (fused / 4·mm)", "GEMM GFLOP/s",
                "GEMM roofline (fused / products at that rate)"]
    headers += ["peak MB above inputs: fused"] + [LABELS[b] for b in baselines]
    rows = []
    keys = []
    for r in results:
        key = (r.params["N"], r.params.get("mode", "self"), r.params["dtype"])
        if key not in keys:
            keys.append(key)
    for n, mode, dt in keys:
        fused = _find(results, "fused", n, dt, mode)
        base = {b: _find(results, b, n, dt, mode) for b in baselines}
        row = [n, mode, dt, H.fmt_seconds(fused)] + [H.fmt_seconds(base[b]) for b in baselines]
        row += [H.fmt_ratio(H.ratio(base[b], fused)) for b in baselines]
        mm = fused.get("mm_s") if fused is not None else None
        row += ["—" if mm is None else H._sig(mm)]
        roof = fused.get("roofline") if fused is not None else None
        row += ["—" if roof is None else f"{roof:.2f}"]
        rate = fused.get("gemm_gflops") if fused is not None else None
        groof = fused.get("gemm_roofline") if fused is not None else None
        row += ["—" if rate is None else f"{rate:.0f}", "—" if groof is None else f"{groof:.2f}"]
        row += [H.fmt_mb(fused)] + [H.fmt_mb(base[b]) for b in baselines]
        rows.append(row)
    text = H.markdown_table(headers, rows)
    diffs = [v for r in results if r.ok and r.provider == "fused"
             for k, v in r.metrics.items() if k.startswith("loss_rel_diff")]
    by_dtype = {}
    for r in results:
        if r.ok and r.provider == "fused":
            for k, v in r.metrics.items():
                if k.startswith("loss_rel_diff"):
                    by_dtype[r.params["dtype"]] = max(by_dtype.get(r.params["dtype"], 0.0), v)
    if diffs:
        text += ("\n\nLoss check (same value from every provider): max relative difference to "
                 "fused " + ", ".join(f"{dt} {v:.1e}" for dt, v in by_dtype.items()) + ".")
    return text


def parser():
    p = H.base_parser(__doc__, repeat=3)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="numbers of embeddings N (default 4096 16384 65536)")
    p.add_argument("--large", action="store_true", help=f"also N = {LARGE_SIZE}")
    H.add_dtypes_option(p, default=("float32", "bfloat16"), what="the embeddings")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=["self"], choices=MODES,
                   help="self-contrast (default) and/or general mode (q, k distinct)")
    p.add_argument("--max-baseline-s", type=float, default=90.0,
                   help="skip a baseline whose time, extrapolated (N^2) from its time at a "
                        "smaller N in this run, exceeds this; 0 disables (default 90)")
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="do not time torch.mm")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results, args.providers))


if __name__ == "__main__":
    sys.exit(main())
