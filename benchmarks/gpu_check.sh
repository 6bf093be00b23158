#!/usr/bin/env bash
# The one-shot check to hand to a borrowed GPU machine:
#
#     bash benchmarks/gpu_check.sh OUT_DIR [--budget 480] [--no-build] [--python PATH]
#
# Builds the extension if needed (FASTIML_CUDA=1 bash .ci/setup, only when fastiml.ops does not
# import or lacks its CUDA kernels on a GPU machine), runs `fastiml selftest --full`, then the
# timings, each with its benchmark script's own command line:
#   pair_stats  SupCon self mode, bf16, N = 65,536, D = 128, fwd+bwd, 1 warm-up + 10 runs;
#               target <= 2 x the README's bound (5.6 ms on an H100/H200)
#   MPCLoss     batch 4 and batch 16, 512^2, C = 256, float32, 1 + 3 runs each;
#               target: time at 16 <= 4.5 x time at 4
#   ClipLoss, SigLipLoss  B = 65,536, D = 512, bf16, 1 + 3 runs each; targets: <= 736 MB
#               above the inputs, faster than open_clip (reported where open_clip did not run)
#   NTXentLoss  SimCLR N = 65,536, D = 128, float32, 1 + 3 runs (reported, no target)
# and writes OUT_DIR/summary.md (the table), OUT_DIR/results.json (the raw numbers),
# OUT_DIR/logs/<part>.log. Each part runs under a timeout; all the parts after the build fit in
# --budget seconds (default 480: 8 minutes on one H100), a part that no longer fits is skipped
# with the reason. Exit status 1 when a selftest row fails, a part crashes or times out, or a
# timing is above its target. Without a GPU only the CPU selftest runs (the GPU parts are listed
# as skipped, with the reason) and the exit status is 0 when it passes.
# The details: benchmarks/gpu_check.py (the driver; it needs only the standard library).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--budget SECONDS] [--no-build]" \
       "[--python PATH]" >&2
  exit 2
fi
py=${FASTIML_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
exec "$py" "$repo/benchmarks/gpu_check.py" "$@"
