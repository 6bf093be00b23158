"""MPC loss, forward + backward: every pixel through the fused op, against the naive per-image
reference with the public code's 5000-pixel sampling and (where it fits) on every pixel.

Input: a batch of B images of S x S (default 4 x 512 x 512): two passes' four-scale embeddings
(strides 4, 8, 16, 32; C = 256; 16,384 + 5,376 pixels per image per pass at 512^2) that require
grad, and masks of random blobs. Providers, each in its own subprocess:

* ``fused``                ``MPCLoss(max_pixels=None)``: all pixels, one ``pair_stats`` call per term.
* ``reference_sampled``    ``reference.mpc_loss(max_pixels=5000)``: the public code's setting.
* ``reference_all``        ``reference.mpc_loss(max_pixels=None)``: all pixels, materialised.

    python -m benchmarks.bench_mpc [--batch 4] [--size 512] [--dim 256] [--repeat 3]
        [--json out.json] [--max-gb 12]
"""
import sys
from typing import List

import torch

from benchmarks import harness as H
from benchmarks.bench_contour import make_masks

BENCHMARK = "mpc"
MODULE = "benchmarks.bench_mpc"
PROVIDERS = ("fused", "reference_sampled", "reference_all")
STRIDES = (4, 8, 16, 32)


def make_inputs(batch: int, size: int, dim: int, dtype: torch.dtype, device, seed: int = 0):
    """Two passes' embeddings (lists of 4 leaves requiring grad) and the masks."""
    g = torch.Generator().manual_seed(seed)

    def one_pass():
        return [torch.randn(batch, dim, -(-size // s), -(-size // s), generator=g)
                .to(device=device, dtype=dtype).requires_grad_() for s in STRIDES]

    return one_pass(), one_pass(), make_masks(batch, size, device, seed=seed)


def estimate_bytes(provider: str, batch: int, size: int, dim: int) -> float:
    """Rough peak (memory guard only). The reference keeps, per image and term, the anchor x
    anchor and anchor x negative float32 matrices and about as much again for autograd."""
    pixels = sum((size // s) ** 2 for s in STRIDES)
    inputs = 2 * batch * pixels * dim * 4
    if provider == "fused":
        return 6 * inputs
    per_set = 5000 if provider == "reference_sampled" else pixels
    return inputs + batch * 5 * 3 * 4 * float(per_set) ** 2


def run_case(case: dict) -> dict:
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    from fastiml import reference
    from fastiml.losses import MPCLoss
    feats_a, feats_b, mask = make_inputs(int(case["batch"]), int(case["size"]), int(case["dim"]),
                                         H.dtype_of(case.get("dtype", "float32")), device)
    provider = case["provider"]
    leaves = feats_a + feats_b
    last = {}

    def step():
        for t in leaves:
            t.grad = None
        generator = torch.Generator().manual_seed(0)
        if provider == "fused":
            total, _ = MPCLoss()(feats_a, feats_b, mask)
        else:
            max_pixels = 5000 if provider == "reference_sampled" else None
            total, _ = reference.mpc_loss(feats_a, feats_b, mask, max_pixels=max_pixels,
                                          generator=generator)
        total.backward()
        last["loss"] = total.detach()

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 3)), device=device)
    return {**timing, **meter.stop(), "loss": float(last["loss"]), "threads": threads}


def run(args) -> List[H.Result]:
    results = []
    for provider in PROVIDERS:
        params = {"B": args.batch, "S": args.size, "C": args.dim, "dtype": "float32",
                  "device": args.device}
        status = H.memory_guard(estimate_bytes(provider, args.batch, args.size, args.dim),
                                args.max_gb)
        if status is not None:
            results.append(H.Result(BENCHMARK, provider, params, status))
            continue
        case = {"provider": provider, "batch": args.batch, "size": args.size, "dim": args.dim,
                "device": args.device, "threads": args.threads, "repeat": args.repeat}
        H.progress(f"[mpc] {provider} ...")
        out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
        r = H.result_from_child(BENCHMARK, provider, params, out, keep=("loss",))
        H.progress(f"[mpc] {provider}: {H.fmt_seconds(r)} s, {H.fmt_mb(r)} MB above inputs")
        results.append(r)
    fused = H.find_result(results, "fused")
    if fused is not None and fused.ok:
        for name in ("reference_sampled", "reference_all"):
            s = H.ratio(H.find_result(results, name), fused)
            if s is not None:
                fused.metrics[f"speedup_vs_{name}"] = s
    return results


def table(results: List[H.Result]) -> str:
    headers = ["B×S²", "fused (all pixels) s", "reference, 5000 sampled s",
               "reference, all pixels s", "speed-up vs sampled", "peak MB above inputs: fused",
               "sampled", "all"]
    f, smp, full = (H.find_result(results, p) for p in PROVIDERS)
    any_r = f or smp or full
    ratio = H.ratio(smp, f)
    rows = [[f"{any_r.params['B']}×{any_r.params['S']}²", H.fmt_seconds(f), H.fmt_seconds(smp),
             H.fmt_seconds(full), H.fmt_ratio(ratio), H.fmt_mb(f), H.fmt_mb(smp),
             H.fmt_mb(full)]]
    return H.markdown_table(headers, rows)


def parser():
    p = H.base_parser(__doc__, repeat=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="image side S (default 512)")
    p.add_argument("--dim", type=int, default=256, help="embedding channels C (default 256)")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
