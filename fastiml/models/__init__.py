"""Networks of fastiml, all randomly initialised (nothing is downloaded).

- ``NCLNet``: DeepLabV3+ with two pivot branches (projection + segmentation head each), for NCL.
- ``MPCNet``: ResNet + FPN with stochastic depth, four embedding heads and a localisation head,
  trained in two stages, for MPC.
- ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` / ``build_resnet``: the encoders.
- ``layers``: shared blocks (DropPath, ConvBNReLU, ASPP, ProjectionHead, SegHead, ...).
"""
from . import layers
from .mpcnet import FPN, MPCNet
from .nclnet import NCLBranch, NCLNet, ResNetLowHigh
from .resnet import (RESNETS, BasicBlock, Bottleneck, ResNet, build_resnet, resnet18, resnet34,
                     resnet50, resnet101)

__all__ = [
    "NCLNet",
    "NCLBranch",
    "ResNetLowHigh",
    "MPCNet",
    "FPN",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "RESNETS",
    "build_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "layers",
]
