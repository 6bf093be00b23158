"""Loss modules. ``SupConLoss`` follows SupContrast; ``fastiml.losses.pml.SupConLoss`` follows
pytorch-metric-learning; ``fastiml.losses.lightly``'s ``NTXentLoss`` / ``DCLLoss`` / ``DCLWLoss``
follow lightly; ``ClipLoss`` and ``SigLipLoss`` follow open_clip; the IML losses (NCL, MPC, pivot
consistency) build on the same ops."""
from fastiml.losses import lightly, pml
from fastiml.losses.clip import ClipLoss, InfoNCELoss
from fastiml.losses.focal import SigmoidFocalLoss, sigmoid_focal_loss
from fastiml.losses.mpc import MPCLoss
from fastiml.losses.ncl import NCLLoss, PivotConsistencyLoss
from fastiml.losses.pixel import PixelSupConLoss
from fastiml.losses.siglip import SigLipLoss
from fastiml.losses.supcon import SupConLoss

__all__ = ["SupConLoss", "PixelSupConLoss", "NCLLoss", "PivotConsistencyLoss", "MPCLoss",
           "SigmoidFocalLoss", "sigmoid_focal_loss", "pml", "lightly", "ClipLoss", "InfoNCELoss",
           "SigLipLoss"]
