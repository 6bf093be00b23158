"""NCL: dual-branch network trained with BCE + patch SupCon (contour pivot) + pivot consistency."""
from fastiml.losses import NCLLoss
from fastiml.methods.base import Method
from fastiml.models import NCLNet


class NCL(Method):
    name = "ncl"
    model_class, loss_class = NCLNet, NCLLoss

    def __init__(self, **options):
        super().__init__(**options)
        self.loss = NCLLoss(**self.loss_options)

    def training_loss(self, model, batch, stage):
        out = model(batch["image"])
        return self.loss(out["proj_a"], out["proj_b"], out["logit_a"], out["logit_b"],
                         batch["mask"], batch.get("valid"))


METHOD = NCL
