"""Contour-patch mining and the contour band: fused kernels against pooling baselines (DESIGN 8).

Input: B x H x W uint8 masks (0/255) of random blobs, default 8 x 1024 x 1024. Cases:

* ``contour_mine`` at patch p = 4 and p = 16 (lo = 0, hi = 1). Providers:
  ``fused`` (``fastiml.ops.contour_mine``; includes its input check), ``reference``
  (``fastiml.reference.contour_mine``: float64 weights, zero pad, sum-pool, comparisons) and
  ``float`` (what one writes by hand: ``mask.float()`` -> ``avg_pool2d(p)`` -> thresholds).
* ``contour_band`` at radius 3. Providers: ``fused`` (``fastiml.ops.contour_band``),
  ``reference`` (``fastiml.reference.contour_band``: float64 max-pool dilations of both classes)
  and ``float`` (the same dilations in float32).

A ``clone`` provider (``mask.clone()``) is the memory-bandwidth yardstick: GB/s are reported
for it (the mask read and written) and for ``fused`` (the mask read once).

Every (case, provider) runs in its own subprocess; reported: median time, speed-up of the fused
kernel, peak RSS above the inputs, and a check that all providers find the same cells / pixels.

    python -m benchmarks.bench_contour [--patches 4 16] [--radius 3] [--batch 8] [--size 1024]
        [--repeat 10] [--json out.json] [--max-gb 12]
"""
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

from benchmarks import harness as H

BENCHMARK = "contour"
MODULE = "benchmarks.bench_contour"
PROVIDERS = ("fused", "reference", "float", "clone")
LABELS = {"fused": "fused", "reference": "reference", "float": "float pool", "clone": "clone"}
# Passes over the uint8 mask that each provider must make, for GB/s.
_PASSES = {"fused": 1, "clone": 2}

# Rough peak bytes per mask pixel (for the memory guard only).
_BYTES_PER_PIXEL = {"fused": 3.0, "reference": 56.0, "float": 14.0, "clone": 1.0}


def estimate_bytes(provider: str, pixels: int) -> float:
    return (1.0 + _BYTES_PER_PIXEL[provider]) * pixels


def make_masks(batch: int, size: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """uint8 masks [batch, size, size] with values 0/255: smooth random fields, thresholded
    into blobs (about a third of the pixels tampered). Made one image at a time, so that no
    large float temporary raises the memory baseline."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.empty(batch, size, size, dtype=torch.uint8)
    coarse = max(2, size // 64)
    for b in range(batch):
        field = torch.rand(1, 1, coarse, coarse, generator=g)
        field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
        masks[b] = (field[0, 0] > 0.6).to(torch.uint8) * 255
    return masks.to(device)


# ------------------------------------------------------------------------------- providers

def _mine_float(mask: torch.Tensor, patch: int, lo: float = 0.0, hi: float = 1.0):
    """The hand-written pooling path; H and W must be multiples of ``patch``."""
    frac = F.avg_pool2d(mask[:, None].float(), patch)[:, 0] / 255.0
    klass = torch.where(frac >= hi, 1, torch.where(frac <= lo, 0, 2)).to(torch.int8)
    return frac, klass


def _band_float(mask: torch.Tensor, radius: int):
    tampered = (mask != 0)[:, None]
    k = 2 * radius + 1
    near_t = F.max_pool2d(tampered.float(), k, 1, radius) > 0
    near_a = F.max_pool2d((~tampered).float(), k, 1, radius) > 0
    return (near_t & near_a)[:, 0]


def op_of(op: str, provider: str, param: int):
    """``f(mask) -> output`` of one provider (``param``: the patch, or the band radius)."""
    from fastiml import ops, reference
    if provider == "clone":
        return lambda m: m.clone()
    if op == "contour_mine":
        return {"fused": lambda m: ops.contour_mine(m, param),
                "reference": lambda m: reference.contour_mine(m, param),
                "float": lambda m: _mine_float(m, param)}[provider]
    if op == "contour_band":
        return {"fused": lambda m: ops.contour_band(m, param),
                "reference": lambda m: reference.contour_band(m, param),
                "float": lambda m: _band_float(m, param)}[provider]
    raise ValueError(f"unknown op {op!r}")


def checksum(op: str, output) -> float:
    """Number of contour cells (mine) or band pixels (band): equal across providers (the clone
    yardstick gives -1)."""
    if isinstance(output, torch.Tensor) and output.dtype == torch.uint8:
        return -1.0
    if op == "contour_mine":
        return float((output[1] == 2).sum())
    return float(output.sum())


def run_case(case: dict) -> dict:
    """One provider of one op on fresh masks: time, peak memory above the masks, checksum
    (number of contour cells, or of band pixels)."""
    device = H.resolve_device(case.get("device", "cpu"))
    threads = H.set_threads(case.get("threads"))
    fn = op_of(case["op"], case["provider"], int(case["param"]))
    mask = make_masks(int(case["batch"]), int(case["size"]), device)
    last = {}

    def step():
        last["out"] = fn(mask)

    meter = H.MemoryMeter(device)
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 10)), device=device)
    return {**timing, **meter.stop(), "checksum": checksum(case["op"], last["out"]),
            "threads": threads}


# -------------------------------------------------------------------------------- the run

def cases(args):
    for p in args.patches:
        yield "contour_mine", "p", p
    if args.radius is not None:
        yield "contour_band", "r", args.radius


def run(args) -> List[H.Result]:
    if args.size % max(args.patches) != 0:
        raise SystemExit("--size must be a multiple of every patch (the float path pools "
                         "without padding)")
    results = []
    pixels = args.batch * args.size * args.size
    for op, pname, param in cases(args):
        for provider in PROVIDERS:
            params = {"op": op, pname: param, "B": args.batch, "H": args.size, "W": args.size,
                      "mask": "uint8 0/255", "device": args.device}
            status = H.memory_guard(estimate_bytes(provider, pixels), args.max_gb)
            if status is not None:
                results.append(H.Result(BENCHMARK, provider, params, status))
                continue
            case = {"op": op, "provider": provider, "param": param, "batch": args.batch,
                    "size": args.size, "device": args.device, "threads": args.threads,
                    "repeat": args.repeat}
            H.progress(f"[contour] {op} {pname}={param} {provider} ...")
            out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
            r = H.result_from_child(BENCHMARK, provider, params, out, keep=("checksum",))
            H.progress(f"[contour] {op} {pname}={param} {provider}: {H.fmt_seconds(r)} s, "
                       f"{H.fmt_mb(r)} MB above inputs")
            results.append(r)
    _derive(results)
    return results


def _key(r: H.Result):
    return (r.params["op"], r.params.get("p", r.params.get("r")))


def _find(results, provider, key) -> Optional[H.Result]:
    for r in results:
        if r.provider == provider and _key(r) == key:
            return r
    return None


def _derive(results):
    for r in results:
        if r.provider in _PASSES and r.ok:
            bytes_moved = _PASSES[r.provider] * r.params["B"] * r.params["H"] * r.params["W"]
            r.metrics["gbytes_per_s"] = bytes_moved / r.metrics["time_s"] / 1e9
    for fused in [r for r in results if r.provider == "fused" and r.ok]:
        for b in ("reference", "float"):
            base = _find(results, b, _key(fused))
            s = H.ratio(base, fused)
            if s is not None:
                fused.metrics[f"speedup_vs_{b}"] = s
            if base is not None and base.ok:
                fused.metrics[f"checksum_equal_{b}"] = float(
                    base.metrics.get("checksum") == fused.metrics.get("checksum"))


def table(results: List[H.Result]) -> str:
    headers = ["op", "param", "B×H×W", "fused s", "reference s", "float pool s",
               "speed-up vs reference", "speed-up vs float pool", "fused GB/s", "clone GB/s",
               "peak MB above inputs: fused", "reference", "float pool", "same output"]
    keys = []
    for r in results:
        if _key(r) not in keys:
            keys.append(_key(r))
    rows = []
    for key in keys:
        f, ref, flt, cl = (_find(results, p, key) for p in PROVIDERS)
        gbs = lambda r: "—" if r is None or r.get("gbytes_per_s") is None else (  # noqa: E731
            f"{r.get('gbytes_per_s'):.1f}")
        any_r = f or ref or flt
        pname = "p" if key[0] == "contour_mine" else "r"
        shape = f"{any_r.params['B']}×{any_r.params['H']}×{any_r.params['W']}"
        sums = {r.metrics.get("checksum") for r in (f, ref, flt) if r is not None and r.ok}
        same = "—" if len(sums) == 0 else ("yes" if len(sums) == 1 else "NO")
        rows.append([key[0], f"{pname}={key[1]}", shape, H.fmt_seconds(f), H.fmt_seconds(ref),
                     H.fmt_seconds(flt), H.fmt_ratio(H.ratio(ref, f)),
                     H.fmt_ratio(H.ratio(flt, f)), gbs(f), gbs(cl), H.fmt_mb(f), H.fmt_mb(ref), H.fmt_mb(flt),
                     same])
    return H.markdown_table(headers, rows) + (
        "\n\n'same output': every provider found the same number of contour cells (mine) or "
        "band pixels (band).")


def parser():
    p = H.base_parser(__doc__, repeat=10)
    p.add_argument("--patches", type=int, nargs="+", default=[4, 16])
    p.add_argument("--radius", type=int, default=3, help="contour_band radius (default 3)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=1024, help="H = W of the masks (default 1024)")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
