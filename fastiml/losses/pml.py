"""Drop-ins with pytorch-metric-learning's signatures: ``from fastiml.losses.pml import SupConLoss``
(or ``NTXentLoss``)."""
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


def _check_pml_options(loss_name: str, distance, reducer, extra: dict) -> None:
    """Only the default cosine distance and the default reducer are fused; anything else is
    named in the error (use pytorch-metric-learning's own class for it)."""
    if distance is not None and not (
            type(distance).__name__ == "CosineSimilarity"
            and getattr(distance, "normalize_embeddings", True)
            and getattr(distance, "p", 2) == 2 and getattr(distance, "power", 1) == 1):
        raise ValueError(f"{loss_name}: distance={type(distance).__name__} is not supported; "
                         f"fastiml's {loss_name} uses cosine similarity (CosineSimilarity())")
    if reducer is not None and type(reducer).__name__ != "MeanReducer":
        raise ValueError(f"{loss_name}: reducer={type(reducer).__name__} is not supported; "
                         f"fastiml's {loss_name} averages over positive pairs (MeanReducer)")
    if extra:
        raise ValueError(f"{loss_name}: options {sorted(extra)} are not supported by fastiml's "
                         f"{loss_name} (supported: temperature, distance=CosineSimilarity(), "
                         f"reducer=MeanReducer())")


class NTXentLoss(nn.Module):
    """pytorch-metric-learning's ``NTXentLoss`` (default distance and reducer), fused.

    Same call, defaults and value: cosine similarity (embeddings L2-normalised), ``temperature``
    0.07; one term per positive pair (i, j) (same label, i != j; every ``ref_emb`` of the same
    label when given), ``-log(e^{s_ij} / (e^{s_ij} + sum_{k in N(i)} e^{s_ik}))`` with N(i) the
    embeddings of another label, averaged over positive pairs (``MeanReducer``); 0, connected
    to the graph, when there is no positive pair or no negative pair (or, as pml does, at most
    one of each). Memory O((N + M) D): never the [positive pairs x negative pairs] matrix that
    pml builds. (pml adds the smallest normal float to the probability inside its log; that
    changes only terms above ~87 nats in float32.)

    Args of ``forward``: ``embeddings`` Tensor[N, D], ``labels`` integer Tensor[N],
    ``ref_emb`` optional Tensor[M, D] with ``ref_labels`` Tensor[M]. ``indices_tuple`` (miner
    output), other distances and reducers are not supported (clear error).
    Returns a scalar: float32 for half embeddings, else their dtype.
    """

    def __init__(self, temperature: float = 0.07, distance=None, reducer=None, **kwargs):
        super().__init__()
        _check_pml_options("NTXentLoss", distance, reducer, kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple (miners) is not supported by the fused NTXentLoss")
        if labels is None:
            raise ValueError("labels are required (the fused NTXentLoss takes no indices_tuple)")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together")
        q = F.normalize(embeddings, p=2, dim=1)
        labels = labels.to(embeddings.device)
        k = k_labels = None
        if ref_emb is not None:
            k = F.normalize(ref_emb, p=2, dim=1)
            k_labels = ref_labels.to(embeddings.device)
        self_contrast = k is None
        args = (q, k, labels, k_labels)
        lse, _, pos_count = ops.pair_stats(*args, tau=self.temperature,
                                           exclude_self=self_contrast, denominator="negatives",
                                           ignore_index=NO_IGNORE)
        total, _ = ops.pair_softplus(*args, lse=lse, tau=self.temperature,
                                     exclude_self=self_contrast, ignore_index=NO_IGNORE)
        positive_pairs = pos_count.sum()
        # Each row meets every column but itself; those not positive are its negatives.
        columns = q.shape[0] - 1 if self_contrast else k.shape[0]
        negative_pairs = (columns - pos_count).sum()
        zero = (embeddings * 0).sum() + (0 if ref_emb is None else (ref_emb * 0).sum())
        mean = total.sum() / positive_pairs.clamp(min=1)
        # pml returns 0 when a positive or a negative pair is missing, and when it has at most
        # one of each (its "all index lists of length <= 1" early exit).
        valid = (positive_pairs > 0) & (negative_pairs > 0) & (
            (positive_pairs > 1) | (negative_pairs > 1))
        return torch.where(valid, mean, zero.to(mean.dtype))
