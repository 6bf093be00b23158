"""The baseline: NCL's network with the BCE terms only (no contrast, no pivot term)."""
from fastiml.losses.ncl import masked_bce
from fastiml.methods.base import Method
from fastiml.models import NCLNet


class BCE(Method):
    name = "bce"
    model_class = NCLNet  # no loss_class: a [method].loss table is an error, not ignored

    def training_loss(self, model, batch, stage):
        out = model(batch["image"])
        mask, valid = batch["mask"], batch.get("valid")
        # gather: under DDP, means over the valid pixels of all ranks (exact with data.mode="pad")
        parts = {"bce_a": masked_bce(out["logit_a"][:, 0], mask, valid, gather=True),
                 "bce_b": masked_bce(out["logit_b"][:, 0], mask, valid, gather=True)}
        return parts["bce_a"] + parts["bce_b"], {k: v.detach() for k, v in parts.items()}


METHOD = BCE
