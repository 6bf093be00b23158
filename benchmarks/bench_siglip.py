"""SigLIP loss forward + backward: fastiml's fused ``SigLipLoss`` against open_clip's
``SigLipLoss``.

Setting: B image and B text features, D = 512, L2-normalised in float32 and cast to each of
``--dtypes`` (default float32; bfloat16 and float16 allowed), a learnable float32 ``log_scale``
initialised to log(10) and passed as ``log_scale.exp()`` and a learnable float32 ``logit_bias``
initialised to -10 (SigLIP's initialisation), then ``backward()`` to the features and both
scalars. Providers, each in its own subprocess:

* ``fastiml``    ``fastiml.losses.SigLipLoss`` (``siglip_loss``: one pass over the tiles with an
                 O(1) epilogue per pair, the gradients from the same pass): O(B D) memory.
* ``open_clip``  open_clip's ``SigLipLoss`` (B x B logits and labels, ``logsigmoid``, autograd);
                 skipped if open_clip_torch is not installed, and by the memory guard (with its
                 estimate) where its B x B matrices do not fit in ``--max-gb``.

The loop, the options (``--dtypes`` included) and the table are bench_clip's
(``run_providers``).

    python -m benchmarks.bench_siglip [--sizes 4096 8192 16384 65536]
        [--dtypes float32 bfloat16] [--repeat 3] [--json out.json] [--max-gb 8]
"""
import math
import sys
from typing import List

import torch

from benchmarks import bench_clip
from benchmarks import harness as H

BENCHMARK = "siglip"
MODULE = "benchmarks.bench_siglip"
INIT_LOG_SCALE, INIT_BIAS = math.log(10.0), -10.0

# open_clip's peak bytes per element of the B x B logits in float32 (logits, labels, their
# product, the log-sigmoid and autograd's gradients): measured 20 at B = 8192 (1.3 GB above the
# inputs), rounded up; scaled to the dtype by bench_clip.estimate_bytes. Memory guard only.
_OPEN_CLIP_BYTES_PER_LOGIT = 24.0


def estimate_bytes(provider: str, b: int, d: int = bench_clip.D,
                   dtype: torch.dtype = torch.float32) -> float:
    """Rough peak memory of one provider (inputs included)."""
    return bench_clip.estimate_bytes(provider, b, d, _OPEN_CLIP_BYTES_PER_LOGIT, dtype)


def loss_module_of(provider: str):
    if provider == "fastiml":
        from fastiml.losses import SigLipLoss
        return SigLipLoss()
    if provider == "open_clip":
        return bench_clip.open_clip_loss_module().SigLipLoss()
    raise ValueError(f"unknown provider {provider!r}; expected one of {bench_clip.PROVIDERS}")


def run_case(case: dict) -> dict:
    """One provider, forward + backward to the features, the scale and the bias."""
    return bench_clip.time_loss(case, loss_module_of(case["provider"]), lambda device: [
        (torch.tensor(INIT_LOG_SCALE, device=device).requires_grad_(), torch.exp),
        (torch.tensor(INIT_BIAS, device=device).requires_grad_(), lambda x: x)])


def run(args) -> List[H.Result]:
    return bench_clip.run_providers(args, BENCHMARK, MODULE, run_case, estimate_bytes)


def main(argv=None) -> int:
    return H.main(bench_clip.parser(__doc__), argv, benchmark=BENCHMARK, run_case=run_case,
                  run=run, table=lambda results, args: bench_clip.table(results))


if __name__ == "__main__":
    sys.exit(main())
