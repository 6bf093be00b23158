"""CLIP loss forward + backward: fastiml's fused ``ClipLoss`` against open_clip's ``ClipLoss``.

Setting: B image and B text features, D = 512, L2-normalised (as open_clip's models return
them) in float32 and then cast to each of ``--dtypes`` (default float32; bfloat16 and float16 as
mixed-precision training hands them over), a learnable float32 ``log_scale`` initialised to
log(1 / 0.07) and passed as ``log_scale.exp()`` (open_clip's convention), then ``backward()`` to
the features and the scale. Every provider gets the same features in the same dtype; open_clip
then computes its logits in that dtype, fastiml accumulates in float32.
Providers, each in its own subprocess:

* ``fastiml``    ``fastiml.losses.ClipLoss`` (``clip_lse``: both directions from one pass over
                 the tiles, one recompute of each tile backward): O(B D) memory.
* ``open_clip``  open_clip's ``ClipLoss`` (two B x B logit matrices, cross-entropy, autograd);
                 skipped if open_clip_torch is not installed, and by the memory guard (with its
                 estimate) where the B x B matrices do not fit in ``--max-gb``.

Both compute the same loss: the relative difference is reported (``loss rel. diff``; in a
half dtype it is open_clip's rounding of the logits, ~1e-3). B grows until open_clip no longer
fits in ``--max-gb`` (skipped, with its estimate).
``benchmarks/bench_siglip.py`` runs SigLIP's loss through the same loop (``run_providers``).

    python -m benchmarks.bench_clip [--sizes 4096 8192 16384 65536] [--dtypes float32 bfloat16]
        [--repeat 3] [--json out.json] [--max-gb 8]
"""
import importlib
import importlib.util
import math
import os
import sys
from typing import List

import torch
import torch.nn.functional as F

from benchmarks import harness as H

BENCHMARK = "clip"
MODULE = "benchmarks.bench_clip"
PROVIDERS = ("fastiml", "open_clip")
DEFAULT_SIZES = (4096, 8192, 16384, 65536)
D, INIT_TEMPERATURE = 512, 0.07

# open_clip's peak bytes per element of one B x B matrix in float32 (both directions' logits,
# their log-softmax and autograd's gradients): ~16 measured by hand at B = 16384 (4.3 GB),
# rounded up. Its matrices are in the features' dtype: half of it in bfloat16 / float16. Memory
# guard only.
_OPEN_CLIP_BYTES_PER_LOGIT = 24.0


def open_clip_available() -> bool:
    return importlib.util.find_spec("open_clip") is not None


def open_clip_loss_module():
    """open_clip's ``loss`` module. Its package ``__init__`` imports the models (torchvision,
    timm, ...); ``loss.py`` itself needs torch only, so it is loaded by path when the package
    cannot be imported whole. Raises ImportError when open_clip_torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open_clip_torch is not installed")
    try:
        return importlib.import_module("open_clip.loss")
    except ImportError:
        path = os.path.join(os.path.dirname(spec.origin), "loss.py")
        loss_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
        module = importlib.util.module_from_spec(loss_spec)
        loss_spec.loader.exec_module(module)
        return module


def estimate_bytes(provider: str, b: int, d: int = D,
                   open_clip_bytes_per_logit: float = _OPEN_CLIP_BYTES_PER_LOGIT,
                   dtype: torch.dtype = torch.float32) -> float:
    """Rough peak memory of one provider (inputs included); ``open_clip_bytes_per_logit`` is
    the float32 figure, scaled to the dtype's element size."""
    esize = dtype.itemsize
    inputs = 4.0 * b * d * esize  # features and their gradients
    if provider == "fastiml":
        return inputs + 4.0 * b * d * 4 + 64e6  # float32 accumulators, tiles
    return inputs + open_clip_bytes_per_logit * esize / 4 * float(b) * float(b)


def loss_module_of(provider: str):
    if provider == "fastiml":
        from fastiml.losses import ClipLoss
        return ClipLoss()
    if provider == "open_clip":
        return open_clip_loss_module().ClipLoss()
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_features(b: int, d: int, device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Image and text features [b, d] normalised in float32, then in ``dtype`` on ``device``:
    leaves requiring grad (the same values for every provider)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(b, d, generator=g), dim=1).to(device=device, dtype=dtype)
                 .requires_grad_() for _ in range(2))


def time_loss(case: dict, loss_fn, make_scalars) -> dict:
    """Times ``loss_fn(image, text, *(f(x) for x, f in scalars))`` forward + backward on
    normalised features of the case's size and dtype (``case["dtype"]``, default float32),
    ``scalars = make_scalars(device)``: (learned float32 leaf, what the loss takes of it) pairs.
    Returns time, peak memory above the inputs (the features and scalars) and the loss value
    (as a Python float, whatever the loss's dtype)."""
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    b, d = int(case["b"]), int(case.get("d", D))
    image, text = make_features(b, d, device, H.dtype_of(case.get("dtype", "float32")))
    scalars = make_scalars(device)
    leaves = [image, text, *(x for x, _ in scalars)]
    last = {}

    def step():
        for x in leaves:
            x.grad = None
        loss = loss_fn(image, text, *(f(x) for x, f in scalars))
        loss.backward()
        last["loss"] = loss.detach()

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 3)), device=device,
                       slow_s=float(case.get("slow_s", 5.0)))
    return {**timing, **meter.stop(), "loss": float(last["loss"]), "threads": threads}


def run_case(case: dict) -> dict:
    """One provider, forward + backward, at one batch size: a learned log-scale initialised to
    log(1 / 0.07), passed as ``log_scale.exp()``."""
    return time_loss(case, loss_module_of(case["provider"]), lambda device: [
        (torch.tensor(math.log(1 / INIT_TEMPERATURE), device=device).requires_grad_(),
         torch.exp)])


# -------------------------------------------------------------------------------- the run

def run_providers(args, benchmark: str, module: str, run_case, estimate) -> List[H.Result]:
    """fastiml and open_clip (each in its own subprocess) at every size of ``args.sizes`` and
    dtype of ``args.dtypes``; ``estimate(provider, b, dtype=dtype)`` feeds the memory guard."""
    providers = [p for p in PROVIDERS if p in args.providers]
    results: List[H.Result] = []
    for b, dt, provider in ((b, dt, p) for b in sorted(set(args.sizes)) for dt in args.dtypes
                            for p in providers):
        params = {"B": b, "D": D, "dtype": dt, "device": args.device,
                  "threads": args.threads or os.cpu_count()}
        label = f"[{benchmark}] B={b} {dt} {provider}"
        status = None
        if provider == "open_clip" and not open_clip_available():
            status = "skipped (open_clip_torch not installed)"
        if status is None:
            status = H.memory_guard(estimate(provider, b, dtype=H.dtype_of(dt)), args.max_gb)
        if status is not None:
            H.progress(f"{label}: {status}")
            results.append(H.Result(benchmark, provider, params, status))
            continue
        case = {"provider": provider, "b": b, "d": D, "dtype": dt, "device": args.device,
                "threads": args.threads, "repeat": args.repeat}
        H.progress(f"{label} ...")
        out = H.run_case_anywhere(module, run_case, case, args.in_process, args.timeout)
        r = H.result_from_child(benchmark, provider, params, out, keep=("loss",))
        H.progress(f"{label}: {H.fmt_seconds(r)} s, {H.fmt_mb(r)} MB above inputs")
        results.append(r)
    _derive(results)
    return results


def run(args) -> List[H.Result]:
    return run_providers(args, BENCHMARK, MODULE, run_case, estimate_bytes)


def _derive(results: List[H.Result]) -> None:
    """Speed-up, memory ratio and loss check of fastiml against open_clip, per batch size and
    dtype."""
    for ours in [r for r in results if r.provider == "fastiml" and r.ok]:
        H.add_baseline_ratios(ours, H.find_result(results, "open_clip", B=ours.params["B"],
                                                  dtype=ours.params["dtype"]), "open_clip")


def table(results: List[H.Result]) -> str:
    headers = ["dtype", "B", "fastiml s", "open_clip s", "speed-up vs open_clip",
               "peak MB above inputs: fastiml", "open_clip", "memory ratio (open_clip / fastiml)",
               "loss rel. diff"]
    rows = []
    # One row per (dtype, B), in the order the run made them.
    for dt, b in dict.fromkeys((r.params["dtype"], r.params["B"]) for r in results):
        ours, base = (H.find_result(results, p, B=b, dtype=dt) for p in PROVIDERS)
        diff = ours.get("loss_rel_diff_vs_open_clip") if ours is not None else None
        rows.append([dt, b, H.fmt_seconds(ours), H.fmt_seconds(base),
                     H.fmt_ratio(H.ratio(base, ours)), H.fmt_mb(ours), H.fmt_mb(base),
                     H.fmt_ratio(H.ratio(base, ours, "peak_above_inputs_mb")),
                     "—" if diff is None else f"{diff:.1e}"])
    return H.markdown_table(headers, rows)


def parser(doc: str = __doc__):
    p = H.base_parser(doc, repeat=3)
    p.set_defaults(max_gb=8.0)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                   help="batch sizes B (default 4096 8192 16384 65536; 65536 runs fastiml only "
                        "at 8 GB)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    H.add_dtypes_option(p, what="the image and text features")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
