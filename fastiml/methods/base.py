"""What the engine needs from a training method: build the model, turn a batch into a loss,
turn images into a probability map. One file per method in this package; see ``__init__``."""
import inspect
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


class Method:
    """Base class of a method. Subclasses set ``name`` and override the three hooks.

    ``options`` come from the config's ``[method]`` table: ``model`` (keyword arguments of
    ``model_class``, the network) and ``loss`` (keyword arguments of ``loss_class``), plus
    method-specific keys. A class left None means the method reads no such table: a non-empty
    one is an error, as is a key the class does not take -- nothing in ``[method]`` is silently
    ignored. Multi-stage methods list their stages in ``stages`` as (name, fraction of the epochs).
    """

    name = "base"
    stages: Tuple[Tuple[str, float], ...] = (("train", 1.0),)
    model_class: Optional[type] = None
    loss_class: Optional[type] = None

    def __init__(self, model: dict = None, loss: dict = None, **extra):
        if extra:
            raise ValueError(f"method {self.name!r} does not read [method] key(s) "
                             f"{', '.join(sorted(extra))}")
        self.model_options = self._options("model", model, self.model_class)
        self.loss_options = self._options("loss", loss, self.loss_class)

    def _options(self, key: str, table, cls: Optional[type]) -> dict:
        """``table`` checked against the keyword arguments of ``cls`` (None: no table read)."""
        if table is None:
            return {}
        if not isinstance(table, dict):
            raise ValueError(f"method {self.name!r}: [method].{key} must be a table, got "
                             f"{table!r}")
        if cls is None:
            if table:
                raise ValueError(f"method {self.name!r} reads no [method].{key} table; got "
                                 f"key(s) {', '.join(sorted(table))}")
            return {}
        params = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(table) - set(params))
            if unknown:
                raise ValueError(f"method {self.name!r} does not read [method].{key} key(s) "
                                 f"{', '.join(unknown)}; {cls.__name__} takes "
                                 f"{', '.join(params)}")
        return dict(table)

    def build_model(self) -> nn.Module:
        if self.model_class is None:
            raise NotImplementedError
        return self.model_class(**self.model_options)

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
