"""MoCo's NT-Xent with a memory bank, forward + backward: fastiml's fused ``NTXentLoss``
(``fastiml.losses.lightly``) against lightly's.

Setting (MoCo): B queries ``out0`` (requiring grad) and their B keys ``out1`` (the momentum
encoder's: no grad), D = 128, temperature 0.1, a memory bank of K = 65,536 x 128
(``memory_bank_size=(K, D)``), then ``backward()``. Each call is one training step: it also
pushes the keys into the FIFO. Both modules are built under the same seed, so their banks start
equal; the loss of the first step (same bank, same inputs) is the value compared. Providers,
each in its own subprocess:

* ``fastiml``  ``fastiml.losses.lightly.NTXentLoss``: the bank's log-sum-exp through
               ``ops.pair_stats`` tiles, no B x K logits, no per-step copy of the bank.
* ``lightly``  ``lightly.loss.NTXentLoss`` (skipped if lightly is not installed): a copy of the
               bank per step, the B x (K + 1) logits, cross-entropy, autograd; skipped by the
               memory guard (with its estimate) where the logits do not fit in ``--max-gb``.

The module and its bank (K D floats) exist before the measurement starts: "above inputs"
counts what a step needs beyond the inputs and the bank.

    python -m benchmarks.bench_lightly [--sizes 512 2048 8192] [--bank 65536] [--repeat 3]
        [--json out.json] [--max-gb 8]
"""
import importlib.util
import os
import sys
from typing import List, Optional

import torch

from benchmarks import harness as H

BENCHMARK = "lightly_ntxent"
MODULE = "benchmarks.bench_lightly"
PROVIDERS = ("fastiml", "lightly")
DEFAULT_SIZES = (512, 2048, 8192)
D, K, TEMPERATURE = 128, 65536, 0.1

# lightly's peak bytes per element of its B x (K + 1) logits (the product, the concatenation,
# the division by T, log-softmax and the gradients autograd keeps): ~12 measured at B = 512,
# K = 65,536 (+416 MB), rounded up. Memory guard only.
_LIGHTLY_BYTES_PER_LOGIT = 16.0


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
    memory above the inputs and the bank, and the first step's loss."""
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
    _derive(results)
    return results


def _find(results, provider, b) -> Optional[H.Result]:
    for r in results:
        if r.provider == provider and r.params["B"] == b:
            return r
    return None


def _derive(results: List[H.Result]) -> None:
    """Speed-up, memory ratio and loss check of fastiml against lightly, per batch size."""
    for ours in [r for r in results if r.provider == "fastiml" and r.ok]:
        H.add_baseline_ratios(ours, _find(results, "lightly", ours.params["B"]), "lightly")


def table(results: List[H.Result]) -> str:
    headers = ["B", "K", "fastiml s", "lightly s", "speed-up vs lightly",
               "peak MB above inputs: fastiml", "lightly", "memory ratio (lightly / fastiml)",
               "loss rel. diff"]
    rows = []
    for b in sorted({r.params["B"] for r in results}):
        ours, base = _find(results, "fastiml", b), _find(results, "lightly", b)
        diff = ours.get("loss_rel_diff_vs_lightly") if ours is not None else None
        k = (ours or base).params["K"]
        rows.append([b, k, H.fmt_seconds(ours), H.fmt_seconds(base),
                     H.fmt_ratio(H.ratio(base, ours)), H.fmt_mb(ours), H.fmt_mb(base),
                     H.fmt_ratio(H.ratio(base, ours, "peak_above_inputs_mb")),
                     "—" if diff is None else f"{diff:.1e}"])
    return H.markdown_table(headers, rows)


def parser():
    p = H.base_parser(__doc__, repeat=3)
    p.set_defaults(max_gb=8.0)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="batch sizes B (default 512 2048 8192)")
    p.add_argument("--bank", type=int, default=K,
                   help=f"memory bank entries K (default {K})")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
