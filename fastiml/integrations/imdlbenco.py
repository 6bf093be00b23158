"""fastiml's NCL and MPC as IMDL-BenCo models.

IMDL-BenCo (github.com/scu-zjz/IMDLBenCo) trains and tests any ``nn.Module`` registered in its
``MODELS`` registry, calling ``model(**batch)`` with its dataset's dict and reading a dict back.
This module follows that contract (IMDLBenCo/model_zoo/iml_vit/iml_vit.py is the reference model,
IMDLBenCo/training_scripts/trainer/trainer.py and tester/tester.py the callers):

- in: ``image`` B×3×H×W normalised with ImageNet mean / std (BenCo's albumentations ``Normalize``),
  ``mask`` B×1×H×W in {0, 1}, ``label`` B, optional ``shape_mask`` B×1×H×W (1 = real image,
  0 = padding, in BenCo's padding mode), and more keys that are ignored (``edge_mask``, ``name``,
  ``shape``, ``origin_shape``, ``if_predcit_label``, ...);
- out: ``backward_loss`` (the fastiml method's training loss), ``pred_mask`` B×1×H×W
  probabilities, ``pred_label`` B (the image score fastiml uses: the maximum of ``pred_mask``
  over real pixels), ``visual_loss`` (dict of scalar tensors: the loss and its named terms) and
  ``visual_image`` ({"pred_mask": ...}).

In eval mode the loss is not computed (BenCo's tester reads only ``pred_mask`` / ``pred_label``):
``backward_loss`` is then 0 and ``visual_loss`` empty. MPC trains in two stages; BenCo runs one
training loop, so ``FastimlMPC(stage=1)`` trains the backbone (contrast), and a second run with
``stage=2`` (initialised from the first run's checkpoint) trains the localisation head.

When ``IMDLBenCo`` is importable, importing this module registers both classes in BenCo's
``MODELS`` (``--model FastimlNCL`` / ``--model FastimlMPC`` in BenCo's scripts). Without it the
classes work the same as plain ``nn.Module`` s. BenCo builds its command-line options from the
``__init__`` signature, so the options are flat, annotated scalars (no ``**kwargs``).
"""
# No `from __future__ import annotations`: BenCo's argument parser uses the annotations of
# __init__ as argparse types, so they must be the types themselves, not strings.
from typing import Dict, Optional

import torch
import torch.nn as nn

from fastiml import methods
from fastiml.models.layers import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FastimlNCL", "FastimlMPC", "BENCO_REGISTERED", "register"]


class _BenCoModel(nn.Module):
    """A fastiml method's network and loss behind BenCo's ``forward(image, mask, label, ...)``."""

    def __init__(self, method: str, model: dict, loss: dict, stage: int = 0, **method_options):
        super().__init__()
        self.method = methods.build(method, model=model, loss=loss, **method_options)
        self.net = self.method.build_model()
        if not 0 <= stage < len(self.method.stages):
            raise ValueError(f"stage must be in 1..{len(self.method.stages)}, got {stage + 1}")
        self.stage = stage
        self.method.start_stage(self.net, stage)
        self.register_buffer("benco_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("benco_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None,
                label: Optional[torch.Tensor] = None, shape_mask: Optional[torch.Tensor] = None,
                *args, **kwargs) -> Dict[str, object]:
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError("image must be a Tensor B×3×H×W (BenCo's ImageNet-normalised image), "
                             f"got {getattr(image, 'shape', type(image).__name__)}")
        # fastiml's networks take [0, 1] images and normalise them themselves.
        x = image * self.benco_std.to(image.dtype) + self.benco_mean.to(image.dtype)
        valid = None if shape_mask is None else shape_mask[:, 0] > 0.5
        seen: Dict[str, torch.Tensor] = {}

        def run(inp):  # the method calls the network itself; keep its outputs for pred_mask
            out = self.net(inp)
            seen.update(out)
            return out

        if self.training and mask is not None:
            batch = {"image": x, "mask": mask[:, 0].to(x.dtype)}
            if valid is not None:
                batch["valid"] = valid
            loss, parts = self.method.training_loss(run, batch, self.stage)
            visual = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
        else:
            run(x)
            loss, visual = x.new_zeros(()), {}
        pred = seen["pred_mask"][: len(image)].float()  # MPC stage 1 runs a doubled batch
        score_map = pred if valid is None else pred.masked_fill(~valid[:, None], 0.0)
        pred_label = score_map.flatten(1).max(dim=1).values
        return {"backward_loss": loss, "pred_mask": pred, "pred_label": pred_label,
                "visual_loss": visual, "visual_image": {"pred_mask": pred}}


class FastimlNCL(_BenCoModel):
    """fastiml's NCL (DeepLabV3+ with two pivot branches + NCLLoss) as a BenCo model.

    Options as in ``fastiml.models.NCLNet`` and ``fastiml.losses.NCLLoss``; ``encoder`` may be
    "timm:<name>" (``pretrained`` then loads timm's weights).
    """

    def __init__(self, encoder: str = "resnet101", pretrained: bool = False, base_width: int = 64,
                 decoder_channels: int = 256, proj_dim: int = 128, patch: int = 4,
                 tau: float = 0.1, lambda_contrast: float = 0.1, lambda_pivot: float = 1.0):
        model = {"encoder": encoder, "base_width": base_width,
                 "decoder_channels": decoder_channels, "proj_dim": proj_dim}
        if pretrained:
            model["pretrained"] = True
        super().__init__("ncl", model, {"patch": patch, "tau": tau,
                                        "lambda_contrast": lambda_contrast,
                                        "lambda_pivot": lambda_pivot})


class FastimlMPC(_BenCoModel):
    """fastiml's MPC (multi-scale network + MPCLoss, then a focal-loss head) as a BenCo model.

    ``stage=1`` trains backbone + embeddings with the pixel-contrast loss (``pred_mask`` comes
    from the untrained head: for monitoring only), ``stage=2`` the localisation head with the
    backbone frozen. Options as in ``fastiml.models.MPCNet`` / ``fastiml.losses.MPCLoss``.
    """

    def __init__(self, encoder: str = "resnet50", pretrained: bool = False, base_width: int = 64,
                 embed_dim: int = 256, drop_path: float = 0.2, head_channels: int = 256,
                 tau: float = 0.1, stage: int = 1, focal_alpha: float = 0.5,
                 focal_gamma: float = 2.0):
        model = {"encoder": encoder, "base_width": base_width, "embed_dim": embed_dim,
                 "drop_path": drop_path, "head_channels": head_channels}
        if pretrained:
            model["pretrained"] = True
        super().__init__("mpc", model, {"tau": tau}, stage=stage - 1, focal_alpha=focal_alpha,
                         focal_gamma=focal_gamma)


def register(registry=None) -> bool:
    """Register ``FastimlNCL`` and ``FastimlMPC`` in ``registry`` (default: BenCo's ``MODELS``).

    Returns False when IMDL-BenCo is not installed (nothing to register in).
    """
    if registry is None:
        try:
            from IMDLBenCo.registry import MODELS as registry
        except ImportError:
            return False
    for cls in (FastimlNCL, FastimlMPC):
        registry.register_module(module=cls, force=True)  # force: re-importing is harmless
    return True


#: True when importing this module registered the models in an installed IMDL-BenCo.
BENCO_REGISTERED = register()
