"""SigLIP's loss without the B x B logits (DESIGN 11), on :func:`fastiml.ops.siglip_loss`."""
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastiml import ops
from fastiml.losses.functional import _AllGather, world

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``, fused: same constructor, call and value.

    ``loss = -(1/B) sum_ij log sigmoid(z_ij (scale <I_i, T_j> + bias))`` over every image i and
    text j, ``z = +1`` for a row's own pair and -1 elsewhere, ``scale = logit_scale`` (already
    exponentiated, as open_clip passes it) and ``bias = logit_bias``, both learned (their
    gradients flow). One pass over the tiles of ``I T^T`` with an O(1) epilogue per pair gives
    the loss; the backward recomputes each tile once for all four gradients. Memory O(B D),
    never B x B.

    Multi-rank (``world_size > 1``, under torch.distributed): each rank's loss is its B images
    against the texts of every rank, positives at ``rank * B + i`` -- open_clip's value for
    every ``dist_impl``. fastiml computes it with one all-gather of the texts with gradients
    (each rank's text gradient summed over ranks), whatever ``dist_impl`` says; open_clip's
    ``bidir`` / ``shift`` neighbour exchanges give the same values and gradients.

    Args of ``forward``: ``image_features``, ``text_features`` Tensor[B, D] (normalised, as
    open_clip's models return them; float32/float16/bfloat16/float64), ``logit_scale``,
    ``logit_bias`` one-element Tensors or floats (``logit_bias=None``: no bias). Returns a
    scalar, float32 for half features (float64 for float64), or ``{"contrastive_loss": loss}``
    with ``output_dict``. Deterministic on the CPU for a given number of threads.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} (or None), got "
                             f"{dist_impl!r}")
        self.cache_labels = cache_labels  # no labels tensor to cache: accepted for the call
        self.rank, self.world_size, self.dist_impl = rank, world_size, dist_impl

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Union[float, Tensor], logit_bias: Optional[Union[float, Tensor]],
                output_dict: bool = False):
        for name, x in (("image_features", image_features), ("text_features", text_features)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if image_features.dim() != 2 or text_features.shape != image_features.shape:
            raise ValueError(f"image_features and text_features must both be [B, D] with the "
                             f"same shape, got {tuple(image_features.shape)} and "
                             f"{tuple(text_features.shape)}")
        dtype = torch.promote_types(image_features.dtype, text_features.dtype)
        image, text = image_features.to(dtype), text_features.to(dtype)
        b = image.shape[0]
        offset = 0
        if self.world_size > 1:
            if world() != (self.rank, self.world_size):
                raise ValueError(f"rank={self.rank}, world_size={self.world_size} do not match "
                                 f"torch.distributed's (rank, world size) = {world()}")
            text = torch.cat(_AllGather.apply(text))
            offset = self.rank * b
        bias = 0.0 if logit_bias is None else logit_bias
        loss = ops.siglip_loss(image, text, logit_scale, bias, offset=offset) / b
        return {"contrastive_loss": loss} if output_dict else loss
