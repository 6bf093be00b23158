"""What the engine needs from a training method: build the model, turn a batch into a loss,
turn images into a probability map. One file per method in this package; see ``__init__``."""
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn


class Method:
    """Base class of a method. Subclasses set ``name`` and override the three hooks.

    ``options`` come from the config's ``[method]`` table: ``model`` (keyword arguments of the
    network) and ``loss`` (keyword arguments of the loss), plus method-specific keys.
    Multi-stage methods list their stages in ``stages`` as (name, fraction of the epochs).
    """

    name = "base"
    stages: Tuple[Tuple[str, float], ...] = (("train", 1.0),)

    def __init__(self, model: dict = None, loss: dict = None, **extra):
        if extra:
            raise ValueError(f"method {self.name!r}: unknown option(s) {sorted(extra)}")
        self.model_options = dict(model or {})
        self.loss_options = dict(loss or {})

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def start_stage(self, model: nn.Module, stage: int) -> List[nn.Parameter]:
        """Prepares ``model`` for stage ``stage`` (0-based); returns the parameters to train."""
        return [p for p in model.parameters() if p.requires_grad]

    def training_loss(self, model: nn.Module, batch: Dict[str, Tensor], stage: int
                      ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(scalar loss, dict of detached named terms) for one batch (already on the device)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model: nn.Module, image: Tensor) -> Tensor:
        """Tampering probability Tensor[B, 1, H, W] in [0, 1] for images Tensor[B, 3, H, W]."""
        return model(image)["pred_mask"]
