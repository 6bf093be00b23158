"""Networks of fastiml, randomly initialised by default (nothing is downloaded).

- ``NCLNet``: DeepLabV3+ with two pivot branches (projection + segmentation head each), for NCL.
- ``MPCNet``: ResNet + FPN with stochastic depth, four embedding heads and a localisation head,
  trained in two stages, for MPC.
- ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` / ``build_resnet``: the encoders.
- ``TimmLowHigh`` / ``TimmMultiScale``: any timm model as encoder (``encoder = "timm:<name>"``,
  optional dependency; ``pretrained = true`` loads timm's weights when they are available).
- ``layers``: shared blocks (DropPath, ConvBNReLU, ASPP, ProjectionHead, SegHead, ...).
"""
from . import layers
from .mpcnet import FPN, MPCNet
from .nclnet import NCLBranch, NCLNet, ResNetLowHigh
from .resnet import (RESNETS, BasicBlock, Bottleneck, ResNet, build_resnet, resnet18, resnet34,
                     resnet50, resnet101)
from .timm_encoder import TimmLowHigh, TimmMultiScale

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
    "TimmLowHigh",
    "TimmMultiScale",
    "layers",
]
