"""MoCo's NT-Xent with a memory bank, forward + backward: fastiml's fused ``NTXentLoss``
(``fastiml.losses.lightly``) against lightly's.

Setting (MoCo): B queries ``out0`` (requiring grad) and their B keys ``out1`` (the momentum
encoder's: no grad), D = 128, temperature 0.1, a memory bank of K = 65,536 x 128
(``memory_bank_size=(K, D)``), then ``backward()``. Each call is one training step: it also
pushes the keys into the FIFO. Both modules are built under the same seed, so their banks start
equal; the loss of the first step (same bank, same inputs) is the value compared. Providers,
each in its own subprocess:

* ``fastiml``  ``fastiml.losses.lightly.NTXentLoss``: the bank's log-sum-exp through
               ``ops.row_lse`` tiles (its forward also forms the softmax-weighted bank mean,
               so the backward makes no product), no B x K logits, no per-step copy of the
               bank.
* ``lightly``  ``lightly.loss.NTXentLoss`` (skipped if lightly is not installed): a copy of the
               bank per step, the B x (K + 1) logits, cross-entropy, autograd; skipped by the
               memory guard (with its estimate) where the logits do not fit in ``--max-gb``.

The module and its bank (K D floats) exist before the measurement starts: "above inputs"
counts what a step needs beyond the inputs and the bank. With ``--paired N`` (default 5), each
size where lightly fits is also timed in one process with the two providers' steps alternating
(``speed-up, paired steps``: the median per-pair ratio): on a shared machine, runs minutes
apart see different loads, two steps back to back nearly the same.

    python -m benchmarks.bench_lightly [--sizes 512 2048 8192 16384] [--bank 65536] [--repeat 3]
        [--paired 5] [--json out.json] [--max-gb 8]
"""
import importlib.util
import os
import statistics
import sys
from typing import List

import torch

from benchmarks import harness as H

BENCHMARK = "lightly_ntxent"
MODULE = "benchmarks.bench_lightly"
PROVIDERS = ("fastiml", "lightly")
DEFAULT_SIZES = (512, 2048, 8192, 16384)
D, K, TEMPERATURE = 128, 65536, 0.1

# lightly's peak bytes per element of its B x (K + 1) logits (the product, the concatenation,
# the division by T, log-softmax and the gradients autograd keeps): 12.2 measured at B = 4096,
# K = 65,536 (+3121 MB), rounded up. Memory guard only.
_LIGHTLY_BYTES_PER_LOGIT = 14.0


def lightly_available() -> bool:
    return importlib.util.find_spec("lightly") is not None


def estimate_bytes(provider: str, b: int, k: int, d: int = D) -> float:
    """Rough peak memory of one provider (inputs and bank included)."""
    inputs = 2.0 * b * d * 4 + float(k) * d * 4
    if provider == "fastiml":
        return inputs + 6.0 * b * d * 4 + 64e6
    return inputs + _LIGHTLY_BYTES_PER_LOGIT * float(b) * (k + 1) + float(k) * d * 4


def loss_module_of(provider: str, k: int, d: int):
    """The provider's NTXentLoss with a (k, d) bank, drawn from the same seed."""
    if provider == "fastiml":
        from fastiml.losses.lightly import NTXentLoss
    elif provider == "lightly":
        # lightly's __init__ otherwise starts a version check against its web API.
        os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")
        from lightly.loss import NTXentLoss
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    torch.manual_seed(0)
    return NTXentLoss(temperature=TEMPERATURE, memory_bank_size=(k, d))


def run_case(case: dict) -> dict:
    """One provider, forward + backward (and the FIFO update), at one (B, K): time, peak
    memory above the inputs and the bank, and the first step's loss (``run_paired_case`` for
    a paired case)."""
    if case.get("paired"):
        return run_paired_case(case)
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    b, k, d = int(case["b"]), int(case.get("k", K)), int(case.get("d", D))
    loss_fn = loss_module_of(case["provider"], k, d).to(device)
    g = torch.Generator().manual_seed(1)
    out0 = torch.randn(b, d, generator=g).to(device).requires_grad_()
    out1 = torch.randn(b, d, generator=g).to(device)
    first = {}

    def step():
        out0.grad = None
        loss = loss_fn(out0, out1)
        loss.backward()
        first.setdefault("loss", loss.detach())

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 3)), device=device,
                       slow_s=float(case.get("slow_s", 5.0)))
    return {**timing, **meter.stop(), "loss": float(first["loss"]), "threads": threads}


def run_paired_case(case: dict) -> dict:
    """Both providers in one process, their steps alternating (one warm-up each, then
    ``pairs`` pairs): the median wall time of each and the median of the per-pair ratios
    lightly / fastiml. Time only. Two steps run back to back see nearly the same load, so on a
    shared machine this ratio moves far less than that of two processes run minutes apart."""
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    b, k, d = int(case["b"]), int(case.get("k", K)), int(case.get("d", D))
    modules = [loss_module_of(p, k, d).to(device) for p in PROVIDERS]
    g = torch.Generator().manual_seed(1)
    out0 = torch.randn(b, d, generator=g).to(device).requires_grad_()
    out1 = torch.randn(b, d, generator=g).to(device)

    def step(loss_fn):
        def once():
            out0.grad = None
            loss_fn(out0, out1).backward()
        return H.time_fn(once, repeat=0, device=device)["time_s"]

    for loss_fn in modules:
        step(loss_fn)
    pairs = [[step(loss_fn) for loss_fn in modules] for _ in range(int(case["pairs"]))]
    return {"time_s": statistics.median(p[0] for p in pairs),
            "lightly_time_s": statistics.median(p[1] for p in pairs),
            "paired_speedup": statistics.median(p[1] / p[0] for p in pairs),
            "pairs": len(pairs), "threads": threads}


# -------------------------------------------------------------------------------- the run

def run(args) -> List[H.Result]:
    providers = [p for p in PROVIDERS if p in args.providers]
    results: List[H.Result] = []
    for b, provider in ((b, p) for b in sorted(set(args.sizes)) for p in providers):
        params = {"B": b, "K": args.bank, "D": D, "dtype": "float32", "device": args.device,
                  "threads": args.threads or os.cpu_count(), "temperature": TEMPERATURE}
        status = None
        if provider == "lightly" and not lightly_available():
            status = "skipped (lightly not installed)"
        if status is None:
            status = H.memory_guard(estimate_bytes(provider, b, args.bank), args.max_gb)
        tag = f"[{BENCHMARK}] B={b} K={args.bank} {provider}"
        if status is not None:
            H.progress(f"{tag}: {status}")
            results.append(H.Result(BENCHMARK, provider, params, status))
            continue
        case = {"provider": provider, "b": b, "k": args.bank, "d": D, "device": args.device,
                "threads": args.threads, "repeat": args.repeat}
        H.progress(f"{tag} ...")
        out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
        r = H.result_from_child(BENCHMARK, provider, params, out, keep=("loss",))
        H.progress(f"{tag}: {H.fmt_seconds(r)} s, {H.fmt_mb(r)} MB above inputs")
        results.append(r)
    if args.paired > 0 and "lightly" in providers and lightly_available():
        results += run_paired(args)
    _derive(results)
    return results


def run_paired(args) -> List[H.Result]:
    """The paired timing (``run_paired_case``) at every size where lightly's memory fits."""
    results = []
    for b in sorted(set(args.sizes)):
        params = {"B": b, "K": args.bank, "D": D, "dtype": "float32", "device": args.device,
                  "threads": args.threads or os.cpu_count(), "temperature": TEMPERATURE,
                  "pairs": args.paired}
        tag = f"[{BENCHMARK}] B={b} K={args.bank} paired"
        status = H.memory_guard(estimate_bytes("lightly", b, args.bank), args.max_gb)
        if status is not None:
            H.progress(f"{tag}: {status}")
            results.append(H.Result(BENCHMARK, "paired", params, status))
            continue
        case = {"paired": True, "b": b, "k": args.bank, "d": D, "device": args.device,
                "threads": args.threads, "pairs": args.paired}
        H.progress(f"{tag} ...")
        out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
        r = H.result_from_child(BENCHMARK, "paired", params, out,
                                keep=("lightly_time_s", "paired_speedup"))
        H.progress(f"{tag}: {H.fmt_ratio(r.get('paired_speedup'))}")
        results.append(r)
    return results


def _derive(results: List[H.Result]) -> None:
    """Speed-up, memory ratio and loss check of fastiml against lightly, per batch size."""
    for ours in [r for r in results if r.provider == "fastiml" and r.ok]:
        H.add_baseline_ratios(ours, H.find_result(results, "lightly", B=ours.params["B"]), "lightly")


def table(results: List[H.Result]) -> str:
    headers = ["B", "K", "fastiml s", "lightly s", "speed-up vs lightly",
               "speed-up, paired steps", "peak MB above inputs: fastiml", "lightly",
               "memory ratio (lightly / fastiml)", "loss rel. diff"]
    rows = []
    for b in sorted({r.params["B"] for r in results}):
        ours, base = H.find_result(results, "fastiml", B=b), H.find_result(results, "lightly", B=b)
        diff = ours.get("loss_rel_diff_vs_lightly") if ours is not None else None
        k = (ours or base).params["K"]
        paired = H.find_result(results, "paired", B=b)
        rows.append([b, k, H.fmt_seconds(ours), H.fmt_seconds(base),
                     H.fmt_ratio(H.ratio(base, ours)),
                     H.fmt_ratio(paired.get("paired_speedup") if paired else None),
                     H.fmt_mb(ours), H.fmt_mb(base),
                     H.fmt_ratio(H.ratio(base, ours, "peak_above_inputs_mb")),
                     "—" if diff is None else f"{diff:.1e}"])
    return H.markdown_table(headers, rows)


def parser():
    p = H.base_parser(__doc__, repeat=3)
    p.set_defaults(max_gb=8.0)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="batch sizes B (default 512 2048 8192 16384; at 16384 lightly's "
                        "logits exceed the default --max-gb 8)")
    p.add_argument("--bank", type=int, default=K,
                   help=f"memory bank entries K (default {K})")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--paired", type=int, default=5, metavar="N",
                   help="also time N alternating fastiml / lightly steps in one process per "
                        "size (the shared-machine-robust speed-up; 0: off; default 5)")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
