"""The NCL network: DeepLabV3+ with two pivot branches (DESIGN.md section 4).

    x ──normalise, pad to /16──► backbone ──► low (stride 4) ──1×1 → 48──────────┐
                                         └──► high (stride 16) ──ASPP──upsample──┴─concat─►
        two 3×3 conv-BN-ReLU ──► F (stride 4) ──┬─► branch A: projection head, segmentation head
                                               └─► branch B: projection head, segmentation head

Branch A is trained with contour patches counted as tampered, branch B with them counted as
authentic (the loss does that; the two branches are structurally identical). Trained from a random
initialisation: nothing is downloaded.

Backbone contract (``backbone=``): any ``nn.Module`` whose ``forward(x)`` takes the normalised,
padded image B×3×H'×W' and returns a pair ``(low, high)``:

- ``low``: B×low_channels×H'/s×W'/s, the fine map the decoder works at (s = 4 for the built-in
  ResNet; any integer s works, and the network's outputs are then at stride s);
- ``high``: B×high_channels×h×w, the coarse, semantic map ASPP runs on (stride 16 in DeepLabV3+;
  it is resized to ``low``'s size, so any size works);

with integer attributes ``low_channels`` and ``high_channels``, and optionally ``size_divisor``
(default 16): the input is zero-padded at the bottom/right to a multiple of it, so that ``low``
tiles the input exactly, and ``input_mean`` / ``input_std`` (default ImageNet's) to normalise
the input with. ``ResNetLowHigh`` adapts the built-in ResNet to this contract, ``TimmLowHigh``
any timm model (``encoder = "timm:<name>"``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (ASPP, IMAGENET_MEAN, IMAGENET_STD, ConvBNReLU, ImageNormalize,
                     ProjectionHead, SegHead, SelfCorrelation, ceil_div, check_image,
                     check_positive_int, check_rate, check_rates, init_weights, pad_to_multiple,
                     stride_of, upsample_crop)
from .resnet import ResNet, build_resnet
from .timm_encoder import TimmLowHigh, check_pretrained, is_timm_encoder

__all__ = ["NCLNet", "NCLBranch", "ResNetLowHigh"]


class ResNetLowHigh(nn.Module):
    """Wrap a ``ResNet`` (built with output_stride=16) into the ``(low, high)`` backbone contract.

    B×3×H×W → (layer1 map, B×channels[0]×H/4×W/4; layer4 map, B×channels[3]×H/16×W/16).
    """

    def __init__(self, trunk: ResNet):
        super().__init__()
        self.trunk = trunk
        self.low_channels = trunk.channels[0]
        self.high_channels = trunk.channels[3]
        self.size_divisor = trunk.size_divisor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1, _, _, c4 = self.trunk(x)
        return c1, c4


class NCLBranch(nn.Module):
    """One pivot branch: a projection head (→ L2-normalised proj_dim) and a 1-channel
    segmentation head, both on the decoder map F. B×C×h×w → (B×proj_dim×h×w, B×1×h×w)."""

    def __init__(self, in_ch: int, proj_dim: int, seg_channels: int):
        super().__init__()
        self.proj = ProjectionHead(in_ch, proj_dim, hidden=in_ch, normalize=True)
        self.seg = SegHead(in_ch, seg_channels, 1)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(f), self.seg(f)


class NCLNet(nn.Module):
    """DeepLabV3+-style network with two pivot branches, for NCL (random initialisation).

    Args:
        encoder: built-in ResNet name ("resnet18", "resnet34", "resnet50", "resnet101") or
            "timm:<name>" for any timm model with ``features_only`` (optional dependency);
            ignored when ``backbone`` is given.
        base_width: ResNet width multiplier (64 standard; 32 / 16 for CPU training).
        proj_dim: dimension D of the contrastive projections.
        aspp_rates: dilation rates of the ASPP 3×3 branches (at stride 16).
        decoder_channels: width of ASPP and of the decoder map F.
        backbone: optional custom backbone following the module docstring's contract.
        drop_path: stochastic-depth rate of the built-in ResNet (0 disables it).
        pretrained: timm encoders only: load timm's ImageNet weights (cache or network; a clear
            error when neither has them). The built-in ResNets start from random weights.
        timm_kwargs: extra keyword arguments of ``timm.create_model`` (timm encoders only).
        self_correlation: k > 0 adds a :class:`~fastiml.models.layers.SelfCorrelation` block
            (each stride-16 position's k best matches elsewhere in the image: a copy-move cue)
            to the ASPP output; 0 (default) leaves the network as above.

    ``forward(x)``, x: B×3×H×W float in [0, 1] (any H, W), returns a dict with s = 4 for the
    built-in ResNet, h = ⌈H/s⌉, w = ⌈W/s⌉ (cell (i, j) covers input pixels [s·i, s·i+s) ×
    [s·j, s·j+s)):

    - ``proj_a``, ``proj_b``: B×proj_dim×h×w, L2-normalised over channels;
    - ``logit_a``, ``logit_b``: B×1×H×W segmentation logits (bilinearly upsampled);
    - ``pred_mask``: B×1×H×W, mean of sigmoid(logit_a) and sigmoid(logit_b), in [0, 1];
    - ``feat``: B×decoder_channels×h×w, the decoder map F.

    Outputs have the input's dtype (the autocast dtype under ``torch.autocast``) and device.
    Eval mode is deterministic on CPU; training mode draws dropout (ASPP) and stochastic depth
    (if ``drop_path`` > 0). On CUDA, cuDNN convolutions are deterministic only with
    ``torch.backends.cudnn.deterministic = True``.
    """

    def __init__(self, encoder: str = "resnet18", base_width: int = 64, proj_dim: int = 128,
                 aspp_rates=(6, 12, 18), decoder_channels: int = 256,
                 backbone: nn.Module | None = None, drop_path: float = 0.0,
                 pretrained: bool = False, timm_kwargs: dict | None = None,
                 self_correlation: int = 0):
        super().__init__()
        self.proj_dim = check_positive_int(proj_dim, "proj_dim")
        check_positive_int(decoder_channels, "decoder_channels")
        aspp_rates = check_rates(aspp_rates, "aspp_rates")
        if backbone is None and is_timm_encoder(encoder):
            backbone = TimmLowHigh(encoder, pretrained, drop_path, timm_kwargs)
        elif backbone is None:
            check_pretrained(encoder, pretrained)
            check_positive_int(base_width, "base_width")
            check_rate(drop_path, "drop_path")
            backbone = ResNetLowHigh(build_resnet(encoder, base_width=base_width,
                                                  drop_path=drop_path, output_stride=16))
        else:
            _check_low_high_backbone(backbone)
        self.backbone = backbone
        self.size_divisor = int(getattr(backbone, "size_divisor", 16))
        self.feat_channels = decoder_channels
        low_ch, high_ch = backbone.low_channels, backbone.high_channels

        self.normalize = ImageNormalize(getattr(backbone, "input_mean", IMAGENET_MEAN),
                                        getattr(backbone, "input_std", IMAGENET_STD))
        self.aspp = ASPP(high_ch, decoder_channels, aspp_rates)
        if (isinstance(self_correlation, bool) or not isinstance(self_correlation, int)
                or self_correlation < 0):
            raise ValueError(f"self_correlation must be an int >= 0, got {self_correlation!r}")
        self.self_corr = (SelfCorrelation(decoder_channels, self_correlation)
                          if self_correlation else None)
        self.low_reduce = ConvBNReLU(low_ch, 48, 1)  # 48 channels: DeepLabV3+'s choice
        self.decoder = nn.Sequential(
            ConvBNReLU(decoder_channels + 48, decoder_channels, 3),
            ConvBNReLU(decoder_channels, decoder_channels, 3),
        )
        seg_channels = max(decoder_channels // 2, 1)
        self.branch_a = NCLBranch(decoder_channels, proj_dim, seg_channels)
        self.branch_b = NCLBranch(decoder_channels, proj_dim, seg_channels)
        # The backbone initialises itself (a custom one may carry its own weights).
        for m in (self.aspp, self.low_reduce, self.decoder, self.branch_a, self.branch_b,
                  self.self_corr):
            if m is not None:
                init_weights(m)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image(x, "x")
        size = tuple(x.shape[-2:])
        xp = pad_to_multiple(self.normalize(x), self.size_divisor)
        low, high = self.backbone(xp)
        s = stride_of(xp.shape[-2:], low, "backbone low map")

        high = self.aspp(high) if self.self_corr is None else self.aspp(high) + self.self_corr(high)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.decoder(torch.cat([high, self.low_reduce(low)], dim=1))
        # Drop the cells that only cover padding, so heads (and their BN stats) see the image.
        feat = feat[..., : ceil_div(size[0], s), : ceil_div(size[1], s)]

        proj_a, logit_a = self.branch_a(feat)
        proj_b, logit_b = self.branch_b(feat)
        logit_a = upsample_crop(logit_a, s, size)
        logit_b = upsample_crop(logit_b, s, size)
        pred = 0.5 * (torch.sigmoid(logit_a) + torch.sigmoid(logit_b))
        return {"proj_a": proj_a, "proj_b": proj_b, "logit_a": logit_a, "logit_b": logit_b,
                "pred_mask": pred, "feat": feat}


def _check_low_high_backbone(backbone) -> None:
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    for attr in ("low_channels", "high_channels"):
        v = getattr(backbone, attr, None)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"backbone must have a positive int attribute `{attr}` "
                             f"(see the NCLNet backbone contract), got {v!r}")
