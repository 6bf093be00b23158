"""The MPC network: a multi-scale backbone with stochastic depth, four embedding heads and a
localisation head, trained in two stages (DESIGN.md section 5).

    x ──normalise, pad to /32──► ResNet (stochastic depth) ──► c1..c4 (strides 4, 8, 16, 32)
        ──FPN──► p1..p4 (fpn_channels each) ──┬─► four 1×1 convs ──► embeddings (stage 1 loss)
                                              └─► upsample to stride 4, concat ──► BN-ReLU-1×1
                                                  conv-BN-ReLU-1×1 conv ──► logit (stage 2 loss)

The paper's code uses HRFormer-B with ImageNet weights; fastiml trains a ResNet + FPN from scratch
(nothing is downloaded). Stochastic depth makes two training-mode passes of one image differ: the
"two modalities" of the cross-modality contrast term. In eval mode the passes agree.

Stages: ``set_stage(1)`` trains backbone + FPN + embedding heads with the contrastive loss (the
localisation head is computed without gradients, for monitoring only); ``set_stage(2)`` freezes
them (``requires_grad=False`` and held in eval mode, so BatchNorm statistics and stochastic depth
are frozen too) and trains only the localisation head.

Backbone contract (``backbone=``): any ``nn.Module`` whose ``forward(x)`` takes the normalised,
padded image B×3×H'×W' and returns a list of 4 maps, finest first, map i of shape
B×channels[i]×H'/s_i×W'/s_i for integer strides s_i (4, 8, 16, 32 for the built-in one); it has an
attribute ``channels`` (4 positive ints) and optionally ``size_divisor`` (default 32): the input is
zero-padded at the bottom/right to a multiple of it, and ``input_mean`` / ``input_std`` (default
ImageNet's). ``encoder = "timm:<name>"`` builds one from timm (``TimmMultiScale``). Two training
passes differ only if the backbone is stochastic (e.g. has stochastic depth).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (IMAGENET_MEAN, IMAGENET_STD, ConvBNReLU, ImageNormalize, ceil_div,
                     check_image, check_positive_int, check_rate, init_weights, pad_to_multiple,
                     stride_of, upsample_crop)
from .resnet import build_resnet
from .timm_encoder import TimmMultiScale, check_pretrained, is_timm_encoder

__all__ = ["MPCNet", "FPN"]


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017): 1×1 laterals, top-down nearest upsampling and sum,
    3×3 conv-BN smoothing (no ReLU: the embedding heads are linear and the localisation head
    starts with BN-ReLU).

    Maps ``[B×in_channels[i]×h_i×w_i]`` (finest first) → ``[B×out_ch×h_i×w_i]``.
    """

    def __init__(self, in_channels: list[int], out_ch: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_ch, 1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBNReLU(out_ch, out_ch, 3, relu=False) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        out = [lat[-1]]
        for f in reversed(lat[:-1]):
            out.insert(0, f + F.interpolate(out[0], size=f.shape[-2:], mode="nearest"))
        return [sm(p) for sm, p in zip(self.smooth, out)]


class MPCNet(nn.Module):
    """Multi-scale network for MPC (random initialisation).

    Args:
        encoder: built-in ResNet name ("resnet18", "resnet34", "resnet50", "resnet101") or
            "timm:<name>" for any timm model with ``features_only`` and >= 4 feature levels
            (optional dependency); ignored when ``backbone`` is given.
        base_width: ResNet width multiplier (64 standard; 32 / 16 for CPU training).
        embed_dim: channels of the four embedding maps (not normalised: the loss normalises).
        drop_path: maximum stochastic-depth rate of the built-in ResNet; must be > 0 for the two
            passes of the cross-modality term to differ.
        head_channels: hidden width of the localisation head.
        backbone: optional custom backbone following the module docstring's contract.
        fpn_channels: width of the pyramid; default min(channels[1], 256) (128 for ResNet-18 at
            base_width 64).
        pretrained: timm encoders only: load timm's ImageNet weights (cache or network; a clear
            error when neither has them). The built-in ResNets start from random weights.
        timm_kwargs: extra keyword arguments of ``timm.create_model`` (timm encoders only).

    ``forward(x)``, x: B×3×H×W float in [0, 1] (any H, W), returns a dict:

    - ``embeddings``: list of 4 tensors B×embed_dim×⌈H/s⌉×⌈W/s⌉, s = 4, 8, 16, 32 (stride 4
      first); cell (i, j) covers input pixels [s·i, s·i+s) × [s·j, s·j+s);
    - ``logit``: B×1×H×W localisation logit (computed at stride 4, bilinearly upsampled);
    - ``pred_mask``: sigmoid(logit), in [0, 1].

    Outputs have the input's dtype (the autocast dtype under ``torch.autocast``) and device.
    Training mode in stage 1 draws stochastic depth per sample (so two passes, or two copies of
    an image in one batch, differ); eval mode and stage 2 are deterministic on CPU (on CUDA, with
    ``torch.backends.cudnn.deterministic = True``). Wrap the model in DDP *after* ``set_stage``:
    DDP records which parameters require gradients when it is built.
    """

    def __init__(self, encoder: str = "resnet18", base_width: int = 64, embed_dim: int = 256,
                 drop_path: float = 0.2, head_channels: int = 256,
                 backbone: nn.Module | None = None, fpn_channels: int | None = None,
                 pretrained: bool = False, timm_kwargs: dict | None = None):
        super().__init__()
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        check_positive_int(head_channels, "head_channels")
        if backbone is None and is_timm_encoder(encoder):
            backbone = TimmMultiScale(encoder, pretrained, drop_path, timm_kwargs)
        elif backbone is None:
            check_pretrained(encoder, pretrained)
            check_positive_int(base_width, "base_width")
            check_rate(drop_path, "drop_path")
            backbone = build_resnet(encoder, base_width=base_width, drop_path=drop_path,
                                    output_stride=32)
        else:
            _check_multiscale_backbone(backbone)
        self.backbone = backbone
        self.size_divisor = int(getattr(backbone, "size_divisor", 32))
        channels = list(backbone.channels)
        if fpn_channels is None:
            fpn_channels = min(channels[1], 256)
        check_positive_int(fpn_channels, "fpn_channels")

        self.normalize = ImageNormalize(getattr(backbone, "input_mean", IMAGENET_MEAN),
                                        getattr(backbone, "input_std", IMAGENET_STD))
        self.fpn = FPN(channels, fpn_channels)
        self.embed = nn.ModuleList(nn.Conv2d(fpn_channels, embed_dim, 1) for _ in range(4))
        cat_ch = 4 * fpn_channels
        self.head = nn.Sequential(
            nn.BatchNorm2d(cat_ch), nn.ReLU(inplace=True),
            nn.Conv2d(cat_ch, head_channels, 1, bias=False),
            nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 1, 1),
        )
        for m in (self.fpn, self.embed, self.head):
            init_weights(m)
        self.stage = 1
        self.set_stage(1)

    # ----------------------------------------------------------------------------- stages

    def _stage1_modules(self) -> list[nn.Module]:
        return [self.backbone, self.fpn, self.embed]

    def set_stage(self, stage: int) -> "MPCNet":
        """Switch training stage: 1 = backbone + FPN + embedding heads learn, localisation head
        frozen; 2 = the reverse, with the stage-1 modules also held in eval mode."""
        if stage not in (1, 2) or isinstance(stage, bool):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        for m in self._stage1_modules():
            m.requires_grad_(stage == 1)
        self.head.requires_grad_(stage == 2)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "MPCNet":
        """As ``nn.Module.train``, but in stage 2 the frozen modules stay in eval mode (frozen
        BatchNorm statistics, no stochastic depth) whatever ``mode`` is."""
        super().train(mode)
        if getattr(self, "stage", 1) == 2:
            for m in self._stage1_modules():
                m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the current stage trains (give these to the optimizer)."""
        mods = self._stage1_modules() if self.stage == 1 else [self.head]
        return [p for m in mods for p in m.parameters()]

    # ----------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> dict:
        check_image(x, "x")
        size = tuple(x.shape[-2:])
        xp = pad_to_multiple(self.normalize(x), self.size_divisor)
        grad = torch.is_grad_enabled()

        # Stage 2: the frozen part runs without building a graph (saves memory and time).
        with torch.set_grad_enabled(grad and self.stage == 1):
            feats = self.backbone(xp)
            if not isinstance(feats, (list, tuple)) or len(feats) != 4:
                raise ValueError("backbone must return a list of 4 feature maps, got "
                                 f"{type(feats).__name__}")
            pyr = self.fpn(list(feats))
            emb = [head(p) for head, p in zip(self.embed, pyr)]
        strides = [stride_of(xp.shape[-2:], p, f"backbone map {i}") for i, p in enumerate(pyr)]
        emb = [e[..., : ceil_div(size[0], s), : ceil_div(size[1], s)] for e, s in zip(emb, strides)]

        # Stage 1: the head is evaluated for monitoring only, without a graph.
        with torch.set_grad_enabled(grad and self.stage == 2):
            fine = pyr[0].shape[-2:]
            cat = torch.cat([pyr[0]] + [F.interpolate(p, size=fine, mode="bilinear",
                                                      align_corners=False) for p in pyr[1:]], 1)
            logit = upsample_crop(self.head(cat), strides[0], size)
        return {"embeddings": emb, "logit": logit, "pred_mask": torch.sigmoid(logit)}


def _check_multiscale_backbone(backbone) -> None:
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    ch = getattr(backbone, "channels", None)
    ok = isinstance(ch, (list, tuple)) and len(ch) == 4 and all(
        not isinstance(c, bool) and isinstance(c, int) and c > 0 for c in ch)
    if not ok:
        raise ValueError("backbone must have an attribute `channels` with 4 positive ints "
                         f"(see the MPCNet backbone contract), got {ch!r}")
