"""Sigmoid focal loss (Lin et al. 2017), the loss of MPC's localisation stage."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastiml.losses.functional import mean_across_ranks


def sigmoid_focal_loss(logit: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 2.0,
                       valid: Optional[Tensor] = None, gather: bool = False) -> Tensor:
    """Mean over (valid) pixels of ``-alpha_t (1 - p_t)^gamma log(p_t)``, float32 math.

    ``logit`` and ``target`` have the same shape; ``target`` in {0, 1}; ``valid`` optional bool.
    ``gather``: under torch.distributed, divide by the valid pixels of all ranks (see
    :func:`fastiml.losses.functional.mean_across_ranks`), so that DDP's averaged gradient is that
    of the mean over the union even when ranks hold different numbers of valid pixels.
    """
    logit, target = logit.float(), target.float()
    ce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    p = torch.sigmoid(logit)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    if valid is None:
        return mean_across_ranks(loss.sum(), loss.new_tensor(float(loss.numel())), gather)
    weight = valid.float().expand_as(loss)
    return mean_across_ranks((loss * weight).sum(), weight.sum(), gather)


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss` (MPC's defaults: alpha 0.5, gamma 2)."""

    def __init__(self, alpha: float = 0.5, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logit: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        return sigmoid_focal_loss(logit, target, self.alpha, self.gamma, valid)
