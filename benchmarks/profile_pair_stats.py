"""Where ``pair_stats``' CPU time goes, per CPU level, from a ``perf`` profile (issue: CPU levels).

Runs the SupCon step of ``bench_pair_stats`` (self mode, N x 128 float32, L2-normalised, tau 0.1,
forward + backward) ``--steps`` times on one thread under ``perf record``, once per level this CPU
supports, and splits the samples into: the forward epilogue (``forward_tile``), the backward
epilogue (``gradient_tile`` and the self backward that inlines it), MKL's GEMM kernel, MKL's
packing and scaling (every other ``mkl_blas`` symbol), and the rest. Each part is reported in ns
per similarity pair (the tiles' pairs: the symmetric schedule's upper tiles) and as a share.

    python -m benchmarks.profile_pair_stats [--n 8192] [--steps 20] [--levels default avx2 avx512]

Needs ``perf`` (linux-perf / linux-tools) with permission to sample the process.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

TILE = 256
FREQ = 2000  # samples per second
PARTS = (("forward epilogue", re.compile(r"forward_tile")),
         ("backward epilogue", re.compile(r"gradient_tile|backward_self|backward_general")),
         ("MKL GEMM kernel", re.compile(r"mkl_blas.*sgemm_kernel")),
         ("MKL packing / scaling", re.compile(r"mkl_blas")))

STEP = """
import sys, torch, torch.nn.functional as F
from fastiml import ops
torch.set_num_threads(1)
n, steps = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = F.normalize(torch.randn(n, 128, generator=g), dim=1)
labels = torch.randint(0, 10, (n,), generator=g)
for _ in range(steps):
    q = x.clone().requires_grad_()
    lse, pos_mean, count = ops.pair_stats(q, None, labels, None, tau=0.1, exclude_self=True)
    keep = count > 0
    (lse[keep] - pos_mean[keep]).mean().backward()
"""


def tile_pairs(n: int) -> int:
    """Pairs of the symmetric schedule's tiles (on and above the diagonal)."""
    sizes = [min(TILE, n - t) for t in range(0, n, TILE)]
    return sum(sizes[r] * sizes[c] for r in range(len(sizes)) for c in range(r, len(sizes)))


def profile(level: str, n: int, steps: int) -> dict:
    env = dict(os.environ, FASTIML_CPU_CAPABILITY=level)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(["perf", "record", "-q", "-F", str(FREQ), "-o", data, sys.executable,
                        "-c", STEP, str(n), str(steps)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                                 "--sort", "symbol", "-F", "sample,sym"],
                                capture_output=True, text=True, check=True).stdout
    samples = {name: 0 for name, _ in PARTS}
    total = 0
    for line in report.splitlines():
        m = re.match(r"\s*(\d+)\s+\[.\]\s+(.*)", line)
        if not m:
            continue
        count, symbol = int(m.group(1)), m.group(2)
        total += count
        for name, pattern in PARTS:
            if pattern.search(symbol):
                samples[name] += count
                break
    pairs = tile_pairs(n) * steps
    return {"samples": samples, "total": total, "pairs": pairs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--levels", nargs="+", default=None,
                   help="CPU levels to profile (default: every level this CPU supports)")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is not installed (apt-get install linux-perf)", file=sys.stderr)
        return 2
    from fastiml import ops
    levels = args.levels or ops.supported_cpu_capabilities()
    print(f"pair_stats self mode, N = {args.n}, D = 128, float32, 1 thread, {args.steps} steps "
          f"(forward + backward); ns per tile pair from perf samples at {FREQ} Hz")
    print("| level | " + " | ".join(name for name, _ in PARTS) + " | everything else |")
    print("|---" * (len(PARTS) + 2) + "|")
    for level in levels:
        r = profile(level, args.n, args.steps)
        ns = lambda count: count / FREQ / r["pairs"] * 1e9  # noqa: E731
        rest = r["total"] - sum(r["samples"].values())
        cells = [f"{ns(c):.3f} ({c / r['total']:.0%})" for c in (*r["samples"].values(), rest)]
        print(f"| {level} | " + " | ".join(cells) + " |")
    print("\n(ns per pair (share of all samples); 'everything else' includes Python start-up "
          "and the per-class sums)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
