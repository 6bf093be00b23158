"""Building blocks shared by the fastiml networks (NCLNet, MPCNet, the ResNet encoders).

Everything here is randomly initialised; nothing is downloaded.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DropPath",
    "ConvBNReLU",
    "SelfCorrelation",
    "ASPP",
    "ProjectionHead",
    "SegHead",
    "ImageNormalize",
    "check_image",
    "check_positive_int",
    "check_rate",
    "check_rates",
    "pad_to_multiple",
    "stride_of",
    "upsample_crop",
    "ceil_div",
    "init_weights",
]

# ImageNet statistics: a fixed, conventional input normalisation (not learned, not downloaded).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- argument checks


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` naming ``name`` if it is not an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_rate(value, name: str) -> float:
    """Return ``value`` as a float in [0, 1), or raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def check_rates(rates, name: str) -> tuple[int, ...]:
    """Return ``rates`` as a tuple of positive ints, or raise ``ValueError`` naming ``name``."""
    ok = isinstance(rates, (list, tuple)) and len(rates) > 0 and all(
        not isinstance(r, bool) and isinstance(r, int) and r > 0 for r in rates)
    if not ok:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {rates!r}")
    return tuple(rates)


def check_image(x, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating B×3×H×W tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape B×3×H×W, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B×3×H×W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (B×3×H×W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor with values in [0, 1], got {x.dtype}")


# --------------------------------------------------------------------------- geometry helpers


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``x`` (B×C×H×W) at the bottom/right so H and W are multiples of ``multiple``.

    Padding only at the bottom/right keeps pixel (y, x) of the input at (y, x) of the output, so
    a stride-s feature cell i covers input rows [s·i, s·i + s) exactly and the result can be
    cropped back with ``[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


def stride_of(padded_size: Sequence[int], feat: torch.Tensor, what: str) -> int:
    """The integer stride of ``feat`` relative to an input of ``padded_size`` (H, W).

    Raises ``ValueError`` when the map does not tile the input exactly (a backbone that breaks
    the contract: its maps must be input_size / stride once the input is a multiple of its
    ``size_divisor``).
    """
    ph, pw = padded_size
    fh, fw = feat.shape[-2:]
    s = ph // fh if fh else 0
    if s <= 0 or fh * s != ph or fw * s != pw:
        raise ValueError(
            f"{what} has spatial size {fh}×{fw}, which is not the padded input size {ph}×{pw} "
            f"divided by an integer stride; give the backbone a `size_divisor` attribute that "
            f"makes its maps tile the input"
        )
    return s


# --------------------------------------------------------------------------- modules


class ImageNormalize(nn.Module):
    """(x - mean) / std with fixed ImageNet statistics. x: B×3×H×W in [0, 1] → same shape.

    The buffers are non-persistent: they are constants, not state, so checkpoints stay clean.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) per sample, for the residual branch of a block.

    In training mode each sample's branch is zeroed with probability ``p`` and scaled by
    1 / (1 - p) otherwise, so the expectation is unchanged; in eval mode it is the identity.
    x: B×... → same shape.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = check_rate(p, "p")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfCorrelation(nn.Module):
    """Copy-move cue: at each position, its ``k`` highest cosine similarities to the other
    positions of the same image, sorted (the self-correlation and sorted pooling of copy-move
    detectors such as BusterNet), mapped to ``out_ch`` channels by a 1x1 conv-BN-ReLU.

    A copied region finds a near-identical twin elsewhere in the image; an ordinary region finds
    only its neighbours, which are excluded (Chebyshev distance <= ``exclude`` cells).
    B×in_ch×h×w → B×out_ch×h×w; memory B·(hw)² (a 768² tile at stride 16: 2304² per image).
    """

    def __init__(self, out_ch: int, k: int = 16, exclude: int = 1):
        super().__init__()
        self.k, self.exclude = int(k), int(exclude)
        self.proj = ConvBNReLU(self.k, out_ch, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        b, _, h, w = f.shape
        n = h * w
        v = F.normalize(f.flatten(2).float(), dim=1)  # B×C×N
        sim = torch.bmm(v.transpose(1, 2), v)  # B×N×N cosine similarities
        yy, xx = torch.meshgrid(torch.arange(h, device=f.device), torch.arange(w, device=f.device),
                                indexing="ij")
        yy, xx = yy.reshape(-1), xx.reshape(-1)
        near = ((yy[:, None] - yy[None, :]).abs() <= self.exclude) & (
            (xx[:, None] - xx[None, :]).abs() <= self.exclude)
        sim = sim.masked_fill(near, -1.0)
        top = sim.topk(min(self.k, n), dim=-1).values  # B×N×k', sorted
        if top.shape[-1] < self.k:
            top = F.pad(top, (0, self.k - top.shape[-1]), value=-1.0)
        top = top.transpose(1, 2).reshape(b, self.k, h, w).to(f.dtype)
        return self.proj(top)


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → ReLU (optional); 'same' padding for odd kernels.

    B×in_ch×H×W → B×out_ch×⌈H/stride⌉×⌈W/stride⌉.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, relu: bool = True):
        padding = dilation * (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average → 1×1 conv → ReLU → broadcast back.

    No BatchNorm here (unlike torchvision): BN over a 1×1 map fails in training with batch 1.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1×1 branch, one dilated 3×3 branch per rate
    and an image-pooling branch, concatenated and fused by a 1×1 conv-BN-ReLU (+ dropout).

    B×in_ch×h×w → B×out_ch×h×w.
    """

    def __init__(self, in_ch: int, out_ch: int = 256, rates: Sequence[int] = (6, 12, 18),
                 dropout: float = 0.1):
        super().__init__()
        rates = check_rates(rates, "rates")
        branches = [ConvBNReLU(in_ch, out_ch, 1)]
        branches += [ConvBNReLU(in_ch, out_ch, 3, dilation=r) for r in rates]
        branches.append(_ASPPPooling(in_ch, out_ch))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            ConvBNReLU(out_ch * len(branches), out_ch, 1),
            nn.Dropout(check_rate(dropout, "dropout")),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class ProjectionHead(nn.Module):
    """Contrastive projection: 1×1 conv → BN → ReLU → 1×1 conv, optionally L2-normalised over
    channels. B×in_ch×h×w → B×out_dim×h×w.
    """

    def __init__(self, in_ch: int, out_dim: int, hidden: int | None = None, normalize: bool = True):
        super().__init__()
        hidden = hidden or in_ch
        self.net = nn.Sequential(ConvBNReLU(in_ch, hidden, 1), nn.Conv2d(hidden, out_dim, 1))
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return F.normalize(z, dim=1) if self.normalize else z


class SegHead(nn.Module):
    """Segmentation head: 3×3 conv-BN-ReLU → 1×1 conv. B×in_ch×h×w → B×out_ch×h×w (logits)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int = 1):
        super().__init__()
        self.net = nn.Sequential(ConvBNReLU(in_ch, mid_ch, 3), nn.Conv2d(mid_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def upsample_crop(logit: torch.Tensor, stride: int, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly upsample a stride-``stride`` map by exactly ``stride`` and crop to ``size``.

    Upsampling by the exact integer factor (then cropping) keeps cell i aligned with input
    pixels [stride·i, stride·i + stride), which a resize straight to ``size`` would not when
    ``size`` is not a multiple of ``stride``. B×C×h×w → B×C×size[0]×size[1].
    """
    h, w = logit.shape[-2:]
    if stride != 1:
        logit = F.interpolate(logit, size=(h * stride, w * stride), mode="bilinear",
                              align_corners=False)
    return logit[..., : size[0], : size[1]]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, unit-scale BN, zero biases: the usual from-scratch
    initialisation of ResNet / DeepLab."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

