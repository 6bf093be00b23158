"""Drop-ins with pytorch-metric-learning's signatures: ``from fastiml.losses.pml import SupConLoss``."""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastiml import ops
from fastiml.losses.functional import NO_IGNORE


class SupConLoss(nn.Module):
    """pytorch-metric-learning's ``SupConLoss`` (default distance and reducer), fused.

    Same call, defaults and value: cosine similarity (embeddings L2-normalised), ``temperature``
    0.1; for each anchor, minus the mean log-probability of its positives over a denominator of
    all other embeddings (all of ``ref_emb`` when given); the mean over anchors whose loss is
    > 0 (``AvgNonZeroReducer``); 0 when the batch has no positive pair or no negative pair.
    The zero loss stays connected to the graph.

    Args of ``forward``: ``embeddings`` Tensor[N, D], ``labels`` integer Tensor[N],
    ``ref_emb`` optional Tensor[M, D] with ``ref_labels`` Tensor[M]. ``indices_tuple`` (miner
    output) is not supported.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple (miners) is not supported by the fused SupConLoss")
        if labels is None:
            raise ValueError("labels are required")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together")
        q = F.normalize(embeddings, p=2, dim=1)
        labels = labels.to(embeddings.device)
        if ref_emb is None:
            lse, pos_mean, pos_count = ops.pair_stats(q, None, labels, None,
                                                      tau=self.temperature, exclude_self=True,
                                                      ignore_index=NO_IGNORE)
            any_negative = (labels != labels[:1]).any()
        else:
            k = F.normalize(ref_emb, p=2, dim=1)
            ref_labels = ref_labels.to(embeddings.device)
            lse, pos_mean, pos_count = ops.pair_stats(q, k, labels, ref_labels,
                                                      tau=self.temperature,
                                                      ignore_index=NO_IGNORE)
            first = labels[:1]
            any_negative = (labels != first).any() | (ref_labels != first).any()
        has_positive = pos_count > 0
        loss = torch.where(has_positive, torch.where(has_positive, lse, 0.0) - pos_mean, 0.0)
        keep = loss > 0
        mean = loss.sum() / keep.sum().clamp(min=1)
        zero = (embeddings * 0).sum()
        return torch.where(has_positive.any() & any_negative & keep.any(), mean.to(zero.dtype),
                           zero)
