"""Pixel-level supervised contrast: every pixel of a feature map is an anchor."""
from torch import Tensor, nn

from fastiml.losses.functional import check_reduction, pixel_supcon_loss


class PixelSupConLoss(nn.Module):
    """SupCon over all pixels of a batch of feature maps, through the fused ``pair_stats``.

    ``forward(features, labels)``: ``features`` Tensor[B, D, H, W], ``labels`` integer
    Tensor[B, H, W] (``ignore_index`` pixels take no part, e.g. padding or uncertain borders).
    Each pixel's loss is ``lse_i - pos_mean_i`` (SupCon, denominator all other counted
    pixels); pixels without a positive are left out. ``within_image=True`` contrasts pixels
    with pixels of their own image only. Features are L2-normalised over D unless
    ``normalize=False``. ``reduction``: "mean" over pixels with a positive, "sum", or "none"
    (Tensor[B, H, W]). Returns float32 for half inputs.

    Memory is O(B H W D): a batch of 8 stride-4 maps of 512^2 images is 131,072 rows, whose
    similarity matrix alone would take 69 GB.
    """

    def __init__(self, tau: float = 0.1, ignore_index: int = -1, within_image: bool = False,
                 normalize: bool = True, reduction: str = "mean"):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        check_reduction(reduction)
        self.tau, self.ignore_index, self.within_image = tau, ignore_index, within_image
        self.normalize, self.reduction = normalize, reduction

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return pixel_supcon_loss(features, labels, tau=self.tau, ignore_index=self.ignore_index,
                                 within_image=self.within_image, normalize=self.normalize,
                                 reduction=self.reduction)
