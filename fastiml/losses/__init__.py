"""Loss modules. ``SupConLoss`` follows SupContrast; ``fastiml.losses.pml.SupConLoss`` follows
pytorch-metric-learning; the IML losses (NCL, MPC, pivot consistency) build on the same ops."""
from fastiml.losses import pml
from fastiml.losses.pixel import PixelSupConLoss
from fastiml.losses.supcon import SupConLoss

__all__ = ["SupConLoss", "PixelSupConLoss", "pml"]
