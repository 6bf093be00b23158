"""Encoders from timm (``encoder = "timm:<name>"``), adapted to NCLNet's and MPCNet's backbone
contracts. timm is optional: it is imported only when such an encoder is asked for.

Any timm model that supports ``features_only=True`` works (ResNets, ConvNeXt, HRNet, EfficientNet,
Swin, ...). The maps are picked by their stride, read from timm's ``feature_info``:

- ``TimmLowHigh`` (NCLNet): ``low`` = the finest map of stride >= 4, ``high`` = the last map. The
  model is built with ``output_stride=16`` (DeepLabV3+) when it supports dilation, else as is.
- ``TimmMultiScale`` (MPCNet): the last four maps (strides 4, 8, 16, 32 for most models).

``pretrained=True`` loads timm's ImageNet weights from the local cache (``~/.cache/huggingface``)
or the network; when neither has them the error says so (nothing else is tried). The default
``pretrained=False`` downloads nothing. Inputs are normalised with the weights' mean / std
(``input_mean`` / ``input_std``), which the networks read.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import check_rate

__all__ = ["TIMM_PREFIX", "is_timm_encoder", "check_pretrained", "create_timm_features", "TimmLowHigh",
           "TimmMultiScale"]

TIMM_PREFIX = "timm:"


def is_timm_encoder(encoder) -> bool:
    """True for an ``encoder`` string of the form ``"timm:<model name>"``."""
    return isinstance(encoder, str) and encoder.startswith(TIMM_PREFIX)


def check_pretrained(encoder, pretrained) -> None:
    """Refuse ``pretrained`` for an encoder that has no weights to load (the built-in ResNets)."""
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained must be a bool, got {pretrained!r}")
    if pretrained and not is_timm_encoder(encoder):
        raise ValueError(f"pretrained = true needs a timm encoder (e.g. 'timm:resnet18'); the "
                         f"built-in {encoder!r} has no pretrained weights")


def _import_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"encoder 'timm:...' needs the optional dependency timm ({e}); "
                          "install it with `pip install timm` (or fastiml[timm])") from None
    return timm


def create_timm_features(encoder: str, pretrained: bool = False, drop_path: float = 0.0,
                         output_stride: int | None = None, **timm_kwargs) -> nn.Module:
    """``timm.create_model(<name>, features_only=True, ...)`` for ``encoder = "timm:<name>"``.

    Args:
        encoder: "timm:" followed by a timm model name (``timm.list_models()``).
        pretrained: load timm's pretrained weights (cache or network); error when unavailable.
        drop_path: stochastic-depth rate (timm's ``drop_path_rate``); 0 leaves the model's default.
        output_stride: ask for a dilated model with this stride (16 for DeepLabV3+); a model that
            does not support it is built with its own strides instead.
        timm_kwargs: more keyword arguments of ``timm.create_model`` (e.g.
            ``pretrained_cfg_overlay = { file = "weights.safetensors" }`` for a local file).
    """
    if not is_timm_encoder(encoder):
        raise ValueError(f"encoder must look like 'timm:<model name>', got {encoder!r}")
    name = encoder[len(TIMM_PREFIX):]
    timm = _import_timm()
    if not timm.is_model(name):
        raise ValueError(f"encoder {encoder!r}: timm has no model {name!r} "
                         "(see timm.list_models())")
    check_pretrained(encoder, pretrained)
    kwargs = dict(timm_kwargs)
    if check_rate(drop_path, "drop_path") > 0:
        kwargs["drop_path_rate"] = drop_path

    def create(pretrained=False, **extra):
        return timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs,
                                 **extra)

    # First without weights: it finds the options the model accepts before anything is fetched.
    # A model without dilation support is built with its own strides.
    attempts = [{"output_stride": output_stride}, {}] if output_stride else [{}]
    for extra in attempts:
        try:
            model = create(**extra)
            break
        except (TypeError, AssertionError, ValueError, NotImplementedError) as e:
            if "drop_path_rate" in str(e):
                raise ValueError(f"encoder {encoder!r} has no stochastic depth: set drop_path = 0 "
                                 f"(timm: {e})") from None
            error = e
    else:
        raise ValueError(f"encoder {encoder!r}: timm cannot build it with features_only=True "
                         f"and {kwargs} ({type(error).__name__}: {error})")
    if not pretrained:
        return model
    try:
        return create(pretrained=True, **extra)
    except Exception as e:  # hub / network errors, missing cache, no weights for this name ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(
            f"encoder {encoder!r}: timm's pretrained weights could not be loaded "
            f"({type(e).__name__}: {first}). They come from the Hugging Face cache "
            "(~/.cache/huggingface, or $HF_HOME) or the network: fetch them once where there is "
            "network access and copy the cache, or pass timm_kwargs = { pretrained_cfg_overlay = "
            "{ file = \"<path>\" } }, or set pretrained = false") from None


class _TimmFeatures(nn.Module):
    """Shared part: the timm feature model, its channels / strides, and the input statistics."""

    def __init__(self, encoder: str, pretrained: bool, drop_path: float,
                 output_stride: int | None, timm_kwargs: dict | None):
        super().__init__()
        self.encoder = encoder
        self.body = create_timm_features(encoder, pretrained, drop_path, output_stride,
                                         **(timm_kwargs or {}))
        self.feature_channels = list(self.body.feature_info.channels())
        self.feature_strides = list(self.body.feature_info.reduction())
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.input_mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.input_std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        # Padding to the coarsest stride makes every map tile the input exactly.
        self.size_divisor = max(self.feature_strides)


class TimmLowHigh(_TimmFeatures):
    """A timm encoder in NCLNet's ``(low, high)`` contract.

    B×3×H×W → (finest map of stride >= 4 [stride 4 for most models], last map [stride 16 when the
    model supports output_stride=16, else its own, e.g. 32]).
    """

    def __init__(self, encoder: str, pretrained: bool = False, drop_path: float = 0.0,
                 timm_kwargs: dict | None = None):
        super().__init__(encoder, pretrained, drop_path, 16, timm_kwargs)
        strides = self.feature_strides
        fine = [i for i, s in enumerate(strides) if s >= 4]
        self.low_index = fine[0] if fine else 0
        self.high_index = len(strides) - 1
        self.low_channels = self.feature_channels[self.low_index]
        self.high_channels = self.feature_channels[self.high_index]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats[self.low_index], feats[self.high_index]


class TimmMultiScale(_TimmFeatures):
    """A timm encoder in MPCNet's four-map contract: its last four feature maps, finest first
    (strides 4, 8, 16, 32 for most models). Needs a model with at least four feature levels."""

    def __init__(self, encoder: str, pretrained: bool = False, drop_path: float = 0.0,
                 timm_kwargs: dict | None = None):
        super().__init__(encoder, pretrained, drop_path, None, timm_kwargs)
        if len(self.feature_strides) < 4:
            raise ValueError(f"encoder {encoder!r} gives {len(self.feature_strides)} feature "
                             "maps; MPCNet needs 4")
        self.indices = list(range(len(self.feature_strides) - 4, len(self.feature_strides)))
        self.channels = [self.feature_channels[i] for i in self.indices]
        self.strides = [self.feature_strides[i] for i in self.indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return [feats[i] for i in self.indices]
