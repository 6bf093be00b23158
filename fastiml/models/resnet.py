"""ResNet encoders (He et al. 2016) written for training from scratch.

Differences from torchvision's classifier, all opt-in or structural:

- ``base_width`` scales every stage (stage widths base·(1, 2, 4, 8), ×4 for Bottleneck); 64 is the
  standard network, 32 or 16 give models that train on a CPU.
- ``drop_path``: stochastic depth on each residual branch, rate increasing linearly from 0 (first
  block) to ``drop_path`` (last block), as in timm / DeiT.
- ``output_stride`` 32 (default), 16 (DeepLabV3+: the last stage is dilated instead of strided) or 8.
- No classifier: ``forward`` returns the four stage maps.

No weights are downloaded; initialisation is Kaiming-normal.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .layers import DropPath, check_positive_int, check_rate, init_weights

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "build_resnet",
    "RESNETS",
]


class BasicBlock(nn.Module):
    """Two 3×3 convs + identity (ResNet-18/34). B×inplanes×H×W → B×planes×H/stride×W/stride."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(shortcut + self.drop_path(out))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride, dilation) → 1×1 expand ×4 + identity (ResNet-50/101).

    B×inplanes×H×W → B×4·planes×H/stride×W/stride. The stride sits on the 3×3 conv (ResNet v1.5).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(shortcut + self.drop_path(out))


class ResNet(nn.Module):
    """A ResNet trunk that returns its four stage maps.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage (4 ints).
        base_width: width of the stem and of stage 1; stage i has base_width·2^i planes.
        drop_path: maximum stochastic-depth rate (last block); 0 disables it.
        output_stride: 32, 16 or 8. Below 32 the last stage(s) keep their resolution and use
            dilation instead (first block of a dilated stage keeps the previous dilation).
        in_channels: input channels (3 for RGB).
        zero_init_residual: initialise each block's last BN scale to 0 so every block starts as
            the identity (Goyal et al. 2017). Off by default: it zeroes the gradient of the first
            convs of each branch at step 0.

    Input B×in_channels×H×W; ``forward`` returns ``[c1, c2, c3, c4]`` with ``channels[i]`` channels
    at strides ``strides`` = (4, 8, 16, 32) (or (4, 8, 16, 16) / (4, 8, 8, 8)); sizes are
    ⌈H/stride⌉ (exact when H is a multiple of 32).
    """

    def __init__(self, block: type, layers: list[int], base_width: int = 64, drop_path: float = 0.0,
                 output_stride: int = 32, in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        check_positive_int(base_width, "base_width")
        check_positive_int(in_channels, "in_channels")
        drop_path = check_rate(drop_path, "drop_path")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0
                                   for n in layers):
            raise ValueError(f"layers must hold 4 positive ints, got {layers!r}")

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        # Stochastic depth rate grows linearly with block index over the whole network.
        total = sum(layers)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        # Stage 3 and/or 4 trade stride for dilation below output stride 32.
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[
            output_stride]

        self.inplanes = base_width
        self.dilation = 1
        stages, strides, channels = [], [], []
        stride_now, k = 4, 0
        for i, n in enumerate(layers):
            planes = base_width * 2**i
            stride = 1 if i == 0 else 2
            if i > 0 and dilate[i - 1]:
                stages.append(self._make_stage(block, planes, n, 1, self.dilation * stride,
                                               rates[k:k + n]))
            else:
                stride_now *= stride
                stages.append(self._make_stage(block, planes, n, stride, self.dilation,
                                               rates[k:k + n]))
            k += n
            strides.append(stride_now)
            channels.append(planes * block.expansion)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels: list[int] = channels
        self.strides: list[int] = strides
        # Padding the input to this multiple makes every map exactly input / stride.
        self.size_divisor = output_stride

        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_stage(self, block, planes, n, stride, new_dilation, rates):
        prev_dilation = self.dilation
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(self.inplanes, planes, stride, prev_dilation, downsample, rates[0])]
        self.inplanes = planes * block.expansion
        self.dilation = new_dilation
        for j in range(1, n):
            blocks.append(block(self.inplanes, planes, 1, new_dilation, None, rates[j]))
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


_SPECS: dict[str, tuple[type, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


def _constructor(name: str) -> Callable[..., ResNet]:
    block, layers = _SPECS[name]

    def build(base_width: int = 64, drop_path: float = 0.0, output_stride: int = 32,
              in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
        return ResNet(block, layers, base_width=base_width, drop_path=drop_path,
                      output_stride=output_stride, in_channels=in_channels,
                      zero_init_residual=zero_init_residual)

    build.__name__ = name
    build.__doc__ = (f"{name.replace('resnet', 'ResNet-')} trunk ({block.__name__}, {layers}); "
                     f"randomly initialised. See ``ResNet`` for the arguments.")
    return build


resnet18 = _constructor("resnet18")
resnet34 = _constructor("resnet34")
resnet50 = _constructor("resnet50")
resnet101 = _constructor("resnet101")

#: name → constructor; the names that ``encoder=`` accepts in NCLNet / MPCNet.
RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}


def build_resnet(name: str, **kwargs) -> ResNet:
    """Build a ResNet by name (``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``).

    ``kwargs`` go to the constructor (base_width, drop_path, output_stride, in_channels,
    zero_init_residual). Raises ``ValueError`` naming ``encoder`` for an unknown name.
    """
    if not isinstance(name, str) or name not in RESNETS:
        raise ValueError(f"encoder must be one of {sorted(RESNETS)}, got {name!r}")
    return RESNETS[name](**kwargs)
