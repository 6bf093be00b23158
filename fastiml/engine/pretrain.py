"""The camera-trace stage: pixel SupCon on source mosaics of real photographs, and the weights
file it writes, which ``train.init`` starts NCL / BCE / MPC training from.

``pretrain_trace`` trains the localisation network's encoder, decoder and projection heads so
that the stride-4 embeddings of pixels from one source (a photograph under one re-processing,
:mod:`fastiml.data.trace`) cluster and those of different sources separate -- every pixel of the
batch through the fused ``pair_stats`` kernel (:class:`fastiml.losses.PixelSupConLoss`). Both
pivot branches' projection heads are trained, so both start from the same trace features.

Weights file (``torch.save`` of a dict): ``format`` = ``"fastiml-init"``, ``model`` (the
network's keyword arguments), ``input_filter``, ``state_dict``, ``provenance`` (photographs,
steps, seconds, seed, final loss, the command line). ``fastiml/weights/camera_trace.pt`` is one,
made by the command in its provenance.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastiml.data.trace import TraceMosaics, labels_at_stride
from fastiml.engine.evaluate import input_filter as apply_input_filter
from fastiml.losses import PixelSupConLoss
from fastiml.models import NCLNet

__all__ = ["pretrain_trace", "load_init", "SHIPPED_INIT", "INIT_FORMAT"]

INIT_FORMAT = "fastiml-init"
#: ``train.init = "camera-trace"`` names the weights shipped in the package
SHIPPED_INIT = {"camera-trace": Path(__file__).resolve().parent.parent / "weights" / "camera_trace.pt"}


def pretrain_trace(photos: Sequence, out: str, *, minutes: float = 20.0, model: Optional[Dict] = None,
                   input_filter: str = "highpass", size: int = 128, batch_size: int = 8,
                   lr: float = 2e-3, tau: float = 0.1, seed: int = 0, threads: int = 0,
                   command: str = "", log: Callable[[str], None] = print) -> Dict:
    """Train ``NCLNet(**model)`` on source mosaics of ``photos`` for ``minutes``; write ``out``.

    Returns the provenance dict written into the file."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    model_options = dict(model or {})
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    data = TraceMosaics(photos, size=size, batch_size=batch_size, seed=seed)
    net = NCLNet(**model_options).eval()
    with torch.no_grad():  # eval mode: a probe must not move the BatchNorm statistics
        stride = size // net(torch.zeros(1, 3, size, size))["proj_a"].shape[-1]
    net.train()
    params = [p for n, p in net.named_parameters() if ".seg." not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    loss_fn = PixelSupConLoss(tau=tau)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0, drop_last=True)
    budget, start = minutes * 60.0, time.perf_counter()
    step, recent = 0, []
    for batch in loader:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        # linear warm-up, then cosine over the time budget
        factor = min(1.0, (step + 1) / 20) * 0.5 * (1.0 + math.cos(math.pi * elapsed / budget))
        for g in opt.param_groups:
            g["lr"] = lr * factor
        out_maps = net(apply_input_filter(batch["image"], input_filter))
        labels = labels_at_stride(batch["labels"], stride)
        loss = 0.5 * (loss_fn(out_maps["proj_a"], labels) + loss_fn(out_maps["proj_b"], labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [float(loss.detach())])[-50:]
        step += 1
        if step % 50 == 0:
            log(f"[pretrain-trace] step {step} {elapsed:.0f}s loss {sum(recent) / len(recent):.4f}")
    provenance = {"photos": [p.name for p in data.files], "sources": data.num_labels,
                  "steps": step, "seconds": round(time.perf_counter() - start, 1), "seed": seed,
                  "size": size, "batch_size": batch_size, "lr": lr, "tau": tau,
                  "final_loss": round(sum(recent) / max(1, len(recent)), 4), "command": command}
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": INIT_FORMAT, "model": model_options, "input_filter": input_filter,
                "state_dict": state, "provenance": provenance}, out)
    log(f"[pretrain-trace] {step} steps in {provenance['seconds']} s, loss "
        f"{provenance['final_loss']}; wrote {out}")
    return provenance


def load_init(model: nn.Module, init: str, model_options: Dict, input_filter: str) -> str:
    """Load the weights file ``init`` (a path, or a name of :data:`SHIPPED_INIT`) into ``model``.

    Every tensor whose name and shape the model shares is loaded: NCL's and BCE's network (the
    one the file was trained as) take encoder, decoder and projection heads; MPC's network takes
    the encoder (``backbone.trunk.*`` is its ``backbone.*``). The segmentation heads keep their
    initialisation. The file's encoder (``encoder``, ``base_width``) and input filter must be
    the run's -- weights of another encoder or trained on other inputs are a ValueError naming
    the difference, not a silent partial load. Returns a one-line summary."""
    path = SHIPPED_INIT.get(init, Path(init))
    if not path.is_file():
        raise ValueError(f"train.init: no weights file {str(path)!r} (a path, or one of "
                         f"{', '.join(SHIPPED_INIT)})")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != INIT_FORMAT:
        raise ValueError(f"train.init: {str(path)!r} is not a fastiml weights file "
                         f"(format {INIT_FORMAT!r}; `fastiml pretrain-trace` writes one)")
    for key in _ENCODER_KEYS:
        if saved["model"].get(key) != model_options.get(key):
            raise ValueError(f"train.init: {str(path)!r} holds a network with {key} = "
                             f"{saved['model'].get(key)!r}, the run builds {key} = "
                             f"{model_options.get(key)!r} (set method.model.{key})")
    if saved["input_filter"] != input_filter:
        raise ValueError(f"train.init: {str(path)!r} was trained with data.input_filter = "
                         f"{saved['input_filter']!r}, the run uses {input_filter!r}")
    own = model.state_dict()
    keep = {}
    for k, v in saved["state_dict"].items():
        if ".seg." in k:
            continue
        for name in (k, k.replace("backbone.trunk.", "backbone.", 1)):
            if name in own and own[name].shape == v.shape:
                keep[name] = v.to(own[name].dtype)
                break
    if not keep:
        raise ValueError(f"train.init: no tensor of {str(path)!r} fits this network")
    model.load_state_dict(keep, strict=False)
    prov = saved.get("provenance", {})
    return (f"started from {path.name}: {len(keep)} of {len(own)} tensors "
            f"({prov.get('steps', '?')} camera-trace steps on {len(prov.get('photos', []))} photographs)")


#: network options that must agree between a weights file and the run it starts
_ENCODER_KEYS = ("encoder", "base_width")
