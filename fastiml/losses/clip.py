"""CLIP / InfoNCE losses without the B x B logits (DESIGN 9, 11): one positive per row.

Single process, ``ClipLoss`` takes both directions from one op, :func:`fastiml.ops.clip_lse`:
one pass over the tiles of ``S = scale I T^T`` gives every row's and every column's
log-sum-exp, and the cross-entropies are ``row_lse_i - S_ii`` and ``col_lse_j - S_jj``.
One direction (``InfoNCELoss``, and ``ClipLoss`` across ranks, where the two directions are two
different matrices: local images against all texts, local texts against all images) runs on
:func:`fastiml.ops.pair_stats` with labels ``arange(B)``: ``lse_i`` over all keys and
``pos_mean_i = s_ii``; there a learned scale (open_clip's ``logit_scale``) is folded into the
queries with tau = 1, so autograd carries its gradient.
"""
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastiml import ops
from fastiml.losses.functional import _AllGather, check_reduction, world


def info_nce_per_row(query: Tensor, key: Tensor, scale: Union[float, Tensor], *,
                     gather: bool = False) -> Tensor:
    """Per-row InfoNCE ``logsumexp_j(scale <q_i, k_j>) - scale <q_i, k_i>``, Tensor[B].

    With ``gather`` under torch.distributed, the keys are every rank's keys (gathered with their
    gradients, as open_clip's ``gather_with_grad``) and the positive of local row i is the key
    at ``rank * B + i`` (open_clip's ``local_loss``). float32 for half inputs.
    """
    if not isinstance(query, Tensor) or not isinstance(key, Tensor):
        raise TypeError("query and key must be Tensors")
    if query.dim() != 2 or key.shape != query.shape:
        raise ValueError(f"query and key must both be [B, D] with the same shape, got "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    # The scale multiplies the queries (a learned scale keeps its gradient); the key follows the
    # dtype this produces, since pair_stats takes one dtype.
    rows = query * scale
    dtype = torch.promote_types(rows.dtype, key.dtype)
    rows, key = rows.to(dtype), key.to(dtype)
    b = query.shape[0]
    rank, size = world()
    first = 0
    if gather and size > 1:
        key = torch.cat(_AllGather.apply(key))
        first = rank * b
    row_labels = torch.arange(first, first + b, device=query.device)
    col_labels = torch.arange(key.shape[0], device=query.device)
    lse, positive, _ = ops.pair_stats(rows, key, row_labels, col_labels, tau=1.0,
                                      ignore_index=-1)
    return lse - positive


def clip_both_directions(image: Tensor, text: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """``(mean_i CE(S_i., i) + mean_j CE(S_.j, j)) / 2`` with ``S = scale I T^T``, from one
    :func:`fastiml.ops.clip_lse` pass. float32 for half inputs (float64 for float64)."""
    if not isinstance(image, Tensor) or not isinstance(text, Tensor):
        raise TypeError("image_features and text_features must be Tensors")
    if image.dim() != 2 or text.shape != image.shape:
        raise ValueError(f"image_features and text_features must both be [B, D] with the same "
                         f"shape, got {tuple(image.shape)} and {tuple(text.shape)}")
    dtype = torch.promote_types(image.dtype, text.dtype)
    image, text = image.to(dtype), text.to(dtype)
    row_lse, col_lse, positive = ops.clip_lse(image, text, scale)
    return (row_lse.mean() + col_lse.mean()) / 2 - positive.mean()


class InfoNCELoss(nn.Module):
    """InfoNCE in one direction: ``query[i]``'s positive is ``key[i]``, every other key (of
    every rank under torch.distributed, with ``gather_across_ranks``) is a negative.

    ``loss_i = logsumexp_j(<q_i, k_j> / temperature) - <q_i, k_i> / temperature``, reduced by
    ``reduction`` ("mean", "sum", "none"). Features are used as given (normalise them first for
    cosine similarity). ``temperature`` may be a float or a Tensor (learned; its gradient
    flows). Memory O(B D): the B x B logits are never formed.

    Args of ``forward``: ``query``, ``key`` Tensor[B, D] (float32/float16/bfloat16/float64).
    Returns float32 (float64 for float64 inputs).
    """

    def __init__(self, temperature: Union[float, Tensor] = 0.1, reduction: str = "mean",
                 gather_across_ranks: bool = True):
        super().__init__()
        if not isinstance(temperature, Tensor) and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_reduction(reduction)
        self.temperature = temperature
        self.reduction = reduction
        self.gather = gather_across_ranks

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        loss = info_nce_per_row(query, key, 1.0 / self.temperature, gather=self.gather)
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, fused: same constructor, call and value.

    ``loss = (CE(scale I T_all^T, labels) + CE(scale T I_all^T, labels)) / 2`` with
    ``scale = logit_scale`` (already exponentiated, as open_clip passes it) and labels the
    row's own pair. Single process: ``I_all = I``, ``T_all = T``, and both directions come from
    one pass over the tiles of ``scale I T^T`` (:func:`fastiml.ops.clip_lse`: row and column
    log-sum-exps, each with its own running maximum; the backward recomputes each tile once for
    both features' and the scale's gradients). With ``world_size > 1`` (under
    torch.distributed), local rows meet every rank's columns, gathered with gradients, and
    labels are offset by ``rank * B``: open_clip's ``local_loss=True, gather_with_grad=True``,
    the only multi-rank mode supported (the others recompute the global B x B logits on every
    rank); the two directions are then two matrices, one ``pair_stats`` call each.
    ``logit_bias`` shifts every logit of a row equally, so it changes neither the loss nor any
    gradient; it is accepted for the call's sake.

    Args of ``forward``: ``image_features``, ``text_features`` Tensor[B, D] (normalised, as
    open_clip's models return them), ``logit_scale`` scalar Tensor or float. Returns a scalar
    (float32 for half features), or ``{"contrastive_loss": loss}`` with ``output_dict``.
    Memory O(B D): the B x B logits are never formed.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod is not supported by fastiml's ClipLoss "
                             "(it gathers with torch.distributed)")
        if world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError(f"with world_size > 1 fastiml's ClipLoss needs local_loss=True and "
                             f"gather_with_grad=True (local rows against all gathered columns), "
                             f"got local_loss={local_loss}, gather_with_grad={gather_with_grad}")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels  # no labels tensor to cache: accepted for the call
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Union[float, Tensor], logit_bias: Optional[Tensor] = None,
                output_dict: bool = False):
        gather = self.world_size > 1
        if gather and world() != (self.rank, self.world_size):
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} do not match "
                             f"torch.distributed's (rank, world size) = {world()}")
        if gather:
            loss = (info_nce_per_row(image_features, text_features, logit_scale,
                                     gather=True).mean()
                    + info_nce_per_row(text_features, image_features, logit_scale,
                                       gather=True).mean()) / 2
        else:
            loss = clip_both_directions(image_features, text_features, logit_scale)
        if logit_bias is not None:  # no effect on the value; keeps it in the graph
            loss = loss + (logit_bias * 0).sum()
        return {"contrastive_loss": loss} if output_dict else loss
