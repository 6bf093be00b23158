"""Procedural image synthesis (``fastiml.data.procedural_image``) against decoding a PNG of the
same size: what one synthetic training image costs next to reading a real one from disk.

Providers, each on ``--count`` images of ``--size`` x ``--size`` (default 20 of 256 x 256):
``procedural`` (one seeded generator per image, as ``fastiml synth`` draws them) and ``decode``
(``cv2.imdecode`` of in-memory PNG files of procedural images, the per-image floor of a data
loader). Reported: median time per batch, images per second, and the ratio decode / procedural
(> 1: synthesis is faster than decoding).

    python -m benchmarks.bench_synth [--count 20] [--size 256] [--repeat 3] [--json out.json]
"""
import sys
from typing import List

import cv2
import numpy as np

from benchmarks import harness as H

BENCHMARK = "synth"
MODULE = "benchmarks.bench_synth"
PROVIDERS = ("procedural", "decode")


def run_case(case: dict) -> dict:
    """One provider on ``count`` images: time, peak memory above the inputs, images per second."""
    from fastiml.data.procedural import procedural_image
    threads = H.set_threads(case.get("threads"))
    count, size = int(case["count"]), int(case["size"])
    if case["provider"] == "procedural":
        def step():
            for i in range(count):
                procedural_image(np.random.default_rng(i), size)
    else:
        files = [cv2.imencode(".png", procedural_image(np.random.default_rng(i), size))[1]
                 for i in range(count)]

        def step():
            for buf in files:
                cv2.imdecode(buf, cv2.IMREAD_COLOR)
    meter = H.MemoryMeter("cpu")
    meter.start()
    timing = H.time_fn(step, repeat=int(case.get("repeat", 3)), device="cpu")
    return {**timing, **meter.stop(), "imgs_per_s": count / timing["time_s"], "threads": threads}


def run(args) -> List[H.Result]:
    results = []
    for provider in PROVIDERS:
        params = {"count": args.count, "H": args.size, "W": args.size, "device": "cpu"}
        case = {"provider": provider, "count": args.count, "size": args.size,
                "threads": args.threads, "repeat": args.repeat}
        H.progress(f"[synth] {provider} ...")
        out = H.run_case_anywhere(MODULE, run_case, case, args.in_process, args.timeout)
        results.append(H.result_from_child(BENCHMARK, provider, params, out, keep=("imgs_per_s",)))
    proc, dec = (H.find_result(results, p) for p in PROVIDERS)
    r = H.ratio(dec, proc)
    if r is not None:
        proc.metrics["speedup_vs_decode"] = r
    return results


def table(results: List[H.Result]) -> str:
    proc, dec = (H.find_result(results, p) for p in PROVIDERS)
    any_r = proc or dec
    rate = lambda r: "—" if r is None or r.get("imgs_per_s") is None else f"{r.get('imgs_per_s'):.1f}"  # noqa: E731
    return H.markdown_table(
        ["images", "H×W", "procedural s", "decode PNG s", "procedural img/s", "decode img/s",
         "decode / procedural"],
        [[any_r.params["count"], f"{any_r.params['H']}×{any_r.params['W']}", H.fmt_seconds(proc),
          H.fmt_seconds(dec), rate(proc), rate(dec), H.fmt_ratio(H.ratio(dec, proc))]])


def parser():
    p = H.base_parser(__doc__, repeat=3)
    p.add_argument("--count", type=int, default=20, help="images per timed run (default 20)")
    p.add_argument("--size", type=int, default=256, help="H = W (default 256)")
    return p


def main(argv=None) -> int:
    return H.main(parser(), argv, benchmark=BENCHMARK, run_case=run_case, run=run,
                  table=lambda results, args: table(results))


if __name__ == "__main__":
    sys.exit(main())
