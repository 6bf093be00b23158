"""MPC: stage 1 trains the backbone with the multi-view pixel-contrast loss on two stochastic
passes; stage 2 trains the localisation head with a sigmoid focal loss, backbone frozen."""
import torch

from fastiml.losses import MPCLoss, sigmoid_focal_loss
from fastiml.methods.base import Method
from fastiml.models import MPCNet


class MPC(Method):
    name = "mpc"
    model_class, loss_class = MPCNet, MPCLoss

    def __init__(self, contrast_fraction: float = 0.5, focal_alpha: float = 0.5,
                 focal_gamma: float = 2.0, **options):
        super().__init__(**options)
        if not 0.0 < contrast_fraction < 1.0:
            raise ValueError(f"contrast_fraction must be in (0, 1), got {contrast_fraction}")
        self.stages = (("contrast", contrast_fraction), ("localize", 1.0 - contrast_fraction))
        self.loss = MPCLoss(**self.loss_options)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def start_stage(self, model, stage):
        net = getattr(model, "module", model)  # DDP wraps the network
        net.set_stage(stage + 1)
        return net.trainable_parameters()

    def training_loss(self, model, batch, stage):
        if stage == 0:
            # The two passes as one forward over the doubled batch: stochastic depth draws per
            # sample, so the copies differ, and DDP sees one forward per backward.
            image = batch["image"]
            both = model(torch.cat([image, image]))["embeddings"]
            first = [e[: len(image)] for e in both]
            second = [e[len(image):] for e in both]
            return self.loss(first, second, batch["mask"])
        out = model(batch["image"])
        focal = sigmoid_focal_loss(out["logit"][:, 0], batch["mask"], self.focal_alpha,
                                   self.focal_gamma, batch.get("valid"), gather=True)
        return focal, {"focal": focal.detach()}


METHOD = MPC
