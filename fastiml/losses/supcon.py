"""SupCon with the signature, defaults and reduction of the SupContrast reference code."""
from typing import Optional

import torch
from torch import Tensor, nn

from fastiml.losses.functional import NO_IGNORE, supcon_per_row


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020), a drop-in for SupContrast's ``SupConLoss``.

    Same arguments, defaults and value: anchors are every view (``contrast_mode="all"``) or the
    first view (``"one"``); the loss of an anchor is ``-(temperature / base_temperature)`` times
    the mean log-probability of its positives, 0 for an anchor with no positive; the result is
    the mean over all anchors. Features are used as given (normalise them first, as SupContrast
    expects). Runs through the fused :func:`fastiml.ops.pair_stats`, so memory stays
    O(bsz * n_views * D) instead of a (bsz * n_views)^2 matrix.

    Args of ``forward``:
        features: Tensor[bsz, n_views, ...] (trailing dims are flattened to D).
        labels: optional integer Tensor[bsz]; ``mask``: optional Tensor[bsz, bsz] with
            mask[i, j] = 1 when sample j is a positive of sample i. Neither: SimCLR (each sample
            its own class). An arbitrary ``mask`` cannot be expressed as labels, so that path
            materialises the similarity matrix (as the reference code does).
    Returns: a scalar Tensor (float32 for half inputs).
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all",
                 base_temperature: float = 0.07):
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        if not temperature > 0 or not base_temperature > 0:
            raise ValueError("temperature and base_temperature must be > 0, got "
                             f"{temperature} and {base_temperature}")
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature

    def forward(self, features: Tensor, labels: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        if features.dim() < 3:
            raise ValueError("features must be [bsz, n_views, ...] (at least 3 dimensions), got "
                             f"shape {tuple(features.shape)}")
        if labels is not None and mask is not None:
            raise ValueError("give labels or mask, not both")
        bsz, n_views = features.shape[0], features.shape[1]
        if mask is not None:
            return self._dense_mask_loss(features, mask)
        if labels is None:
            labels = torch.arange(bsz, device=features.device)
        labels = labels.reshape(-1)
        if labels.shape[0] != bsz:
            raise ValueError(f"labels must have bsz={bsz} entries, got {labels.shape[0]}")
        # View-major rows, as torch.cat(torch.unbind(features, 1)) orders them.
        contrast = features.reshape(bsz, n_views, -1).transpose(0, 1).reshape(bsz * n_views, -1)
        loss, has_positive = supcon_per_row(contrast, labels.repeat(n_views),
                                            tau=self.temperature, ignore_index=NO_IGNORE)
        loss = torch.where(has_positive, loss, torch.zeros_like(loss))
        if self.contrast_mode == "one":  # anchors: the first view; columns: all views
            loss = loss[:bsz]
        return (self.temperature / self.base_temperature) * loss.mean()

    def _dense_mask_loss(self, features: Tensor, mask: Tensor) -> Tensor:
        """The loss for an arbitrary positive ``mask`` [bsz, bsz], on the dense similarity matrix
        (float32, float64 for float64 features): rows are the anchors, columns every view but
        the anchor itself."""
        bsz, n_views = features.shape[0], features.shape[1]
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (bsz, bsz):
            raise ValueError(f"mask must be a Tensor [bsz, bsz] = [{bsz}, {bsz}], got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        contrast = features.reshape(bsz, n_views, -1).transpose(0, 1).reshape(bsz * n_views, -1)
        contrast = contrast.to(dtype)  # view-major rows
        anchors = contrast[:bsz] if self.contrast_mode == "one" else contrast
        logits = anchors @ contrast.t() / self.temperature
        is_self = torch.eye(anchors.shape[0], contrast.shape[0], dtype=torch.bool,
                            device=features.device)
        log_prob = logits - torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1,
                                            keepdim=True)
        positive = mask.to(device=features.device, dtype=dtype).repeat(
            anchors.shape[0] // bsz, n_views).masked_fill(is_self, 0.0)
        count = positive.sum(1)
        mean_log_prob = (positive * log_prob).sum(1) / torch.where(count < 1e-6,
                                                                   torch.ones_like(count), count)
        return -(self.temperature / self.base_temperature) * mean_log_prob.mean()
