"""NT-Xent forward + backward: fastiml's fused ``NTXentLoss`` against pytorch-metric-learning's.

Setting: N embeddings, D = 128 (the losses L2-normalise them), temperature 0.07, then
``backward()``. Labels: SimCLR-shaped (``arange(N / 2)`` twice: every embedding has exactly one
positive, its other view) or, with ``--classes C`` for the sizes in ``--class-sizes``, N / C
embeddings per class. Default cases: SimCLR N = 512 and 16384, N = 4096 with 64 classes
(``--sizes 65536`` adds the largest SimCLR case). Providers, each in its own subprocess:

* ``fastiml``  ``fastiml.losses.pml.NTXentLoss`` (``ops.pair_stats`` for the negatives'
               log-sum-exp, ``ops.pair_softplus`` for the per-pair terms): O(N D) memory.
* ``pml``      ``pytorch_metric_learning.losses.NTXentLoss`` (skipped if not installed). It
               builds a [positive pairs x negative pairs] matrix, so it is skipped by the memory
               guard (with its estimate) beyond a few thousand embeddings.

Both compute the same loss (reported as a check).

    python -m benchmarks.bench_ntxent [--sizes 512 4096 16384] [--class-sizes 4096]
        [--classes 64] [--repeat 3] [--json out.json] [--max-gb 8]
"""
import importlib.util
import os
import sys
from typing import List, Optional

import torch

from benchmarks import harness as H

BENCHMARK = "ntxent"
MODULE = "benchmarks.bench_ntxent"
PROVIDERS = ("fastiml", "pml")
DEFAULT_SIZES = (512, 4096, 16384)
D, TEMPERATURE = 128, 0.07

# pml's peak bytes per element of its [positive pairs x negative pairs] matrices (the float
# mask, the masked logits, their exp, the bool mask and autograd's copies): ~16 measured by hand
# at SimCLR N = 512 (2.2 GB), rounded up. Memory guard only.
_PML_BYTES_PER_ELEMENT = 24.0


def pml_available() -> bool:
    return importlib.util.find_spec("pytorch_metric_learning") is not None


def make_labels(n: int, classes: Optional[int]) -> torch.Tensor:
    """SimCLR (``classes`` None): ``arange(n // 2)`` twice; else n / classes per class."""
    if classes is None:
        if n % 2:
            raise ValueError(f"a SimCLR batch needs an even N, got {n}")
        return torch.arange(n // 2).repeat(2)
    if not 0 < classes <= n:
        raise ValueError(f"classes must be in [1, N={n}], got {classes}")
    return torch.arange(n) % classes


def pair_counts(labels: torch.Tensor):
    """(ordered positive pairs, ordered negative pairs) of a self-contrast batch."""
    n = labels.numel()
    sizes = torch.bincount(labels).double()
    same = float((sizes * sizes).sum())
    return same - n, float(n) * n - same


def estimate_bytes(provider: str, n: int, classes: Optional[int], d: int = D) -> float:
    """Rough peak memory of one provider (inputs included)."""
    inputs = 3.0 * n * d * 4 + 16.0 * n
    if provider == "fastiml":
        return inputs + 4.0 * n * d * 4 + 64e6
    positives, negatives = pair_counts(make_labels(n, classes))
    return inputs + _PML_BYTES_PER_ELEMENT * positives * negatives


def loss_module_of(provider: str):
    if provider == "fastiml":
        from fastiml.losses.pml import NTXentLoss
        return NTXentLoss(temperature=TEMPERATURE)
    if provider == "pml":
        from pytorch_metric_learning.losses import NTXentLoss
        return NTXentLoss(temperature=TEMPERATURE)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def run_case(case: dict) -> dict:
    """One provider, forward + backward, on one case: time, peak memory above the inputs and
    the loss value."""
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    n, d = int(case["n"]), int(case.get("d", D))
    classes = case.get("classes")
    loss_fn = loss_module_of(case["provider"])
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(n, d, generator=g).to(device).requires_grad_()
    labels = make_labels(n, classes).to(device)
    last = {}

    def step():
        emb.grad = None
        loss = loss_fn(emb, labels)
        loss.backward()
        last["loss"] = loss.detach()

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 3)), device=device,
                       slow_s=float(case.get("slow_s", 5.0)))
    return {**timing, **meter.stop(), "loss": float(last["loss"]), "threads": threads}


# -------------------------------------------------------------------------------- the run

def cases_of(args):
    """(N, classes) pairs: SimCLR for every size, except sizes in --class-sizes (classes)."""
    return [(n, args.classes if n in args.class_sizes else None) for n in sorted(set(args.sizes))]


def run(args) -> List[H.Result]:
    providers = [p for p in PROVIDERS if p in args.providers]
    results: List[H.Result] = []
    for (n, classes), provider in ((c, p) for c in cases_of(args) for p in providers):
        params = {"N": n, "D": D, "labels": "simclr" if classes is None else f"{classes} classes",
                  "dtype": "float32", "device": args.device,
                  "threads": args.threads or os.cpu_count(), "temperature": TEMPERATURE}
        status = None
        if provider == "pml" and not pml_available():
            status = "skipped (pytorch-metric-learning not installed)"
        if status is None:
            status = H.memory_guard(estimate_bytes(provider, n, classes), args.max_gb)
        if status is not None:
            H.progress(f"[ntxent] N={n} {params['labels']} {provider}: {status}")
            results.append(H.Result(BENCHMARK, provider, params, status))
            continue
        case = {"provider": provider, "n": n, "d": D, "classes": classes,
                "device": args.device, "threads": args.threads, "repeat": args.repeat}
        H.progress(f"[ntxent] N={n} {params['labels']} {provider} ...")
        out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
        r = H.result_from_child(BENCHMARK, provider, params, out, keep=("loss",))
        H.progress(f"[ntxent] N={n} {params['labels']} {provider}: "
                   f"{H.fmt_seconds(r)} s, {H.fmt_mb(r)} MB above inputs")
        results.append(r)
    _derive(results)
    return results


def _derive(results: List[H.Result]) -> None:
    """Speed-up, memory ratio and loss check of fastiml against pml, per case."""
    for ours in [r for r in results if r.provider == "fastiml" and r.ok]:
        base = H.find_result(results, "pml", N=ours.params["N"], labels=ours.params["labels"])
        H.add_baseline_ratios(ours, base, "pml")


def table(results: List[H.Result]) -> str:
    headers = ["N", "labels", "fastiml s", "pml s", "speed-up vs pml",
               "peak MB above inputs: fastiml", "pml", "memory ratio (pml / fastiml)",
               "loss rel. diff"]
    keys = []
    for r in results:
        key = (r.params["N"], r.params["labels"])
        if key not in keys:
            keys.append(key)
    rows = []
    for n, labels in keys:
        ours, base = H.find_result(results, "fastiml", N=n, labels=labels), H.find_result(results, "pml", N=n, labels=labels)
        diff = ours.get("loss_rel_diff_vs_pml") if ours is not None else None
        rows.append([n, labels, H.fmt_seconds(ours), H.fmt_seconds(base),
                     H.fmt_ratio(H.ratio(base, ours)), H.fmt_mb(ours), H.fmt_mb(base),
                     H.fmt_ratio(H.ratio(base, ours, "peak_above_inputs_mb")),
                     "—" if diff is None else f"{diff:.1e}"])
    return H.markdown_table(headers, rows)


def parser():
    p = H.base_parser(__doc__, repeat=3)
    p.set_defaults(max_gb=8.0)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="numbers of embeddings N (default 512 4096 16384)")
    p.add_argument("--class-sizes", type=int, nargs="*", default=[4096],
                   help="sizes labelled with --classes classes instead of SimCLR pairs "
                        "(default 4096)")
    p.add_argument("--classes", type=int, default=64, help="classes of those sizes (default 64)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
