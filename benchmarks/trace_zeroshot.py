"""What the camera-trace stage learned, before any forgery is seen: zero-shot localisation.

Each tampered image of a list is passed through the network as the weights file left it (no
localisation training); a pixel's score is its embedding's cosine distance from the image's
median embedding (pixels from a foreign source should sit apart). Pixel AUC per forgery kind,
the shipped camera-trace weights against the same network at random initialisation:

    python -m benchmarks.trace_zeroshot --data photos/independent/list.json
    python -m benchmarks.trace_zeroshot --data L --init path/to/weights.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastiml.data import read_image, read_mask
from fastiml.engine.evaluate import input_filter
from fastiml.engine.pretrain import SHIPPED_INIT, load_init
from fastiml.metrics import roc_auc
from fastiml.models import NCLNet


def distance_map(net: NCLNet, image: np.ndarray, kind: str) -> torch.Tensor:
    """Per-pixel cosine distance from the image's median embedding, at the image's size."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)
    with torch.no_grad():
        e = net(input_filter(x, kind))["proj_a"]
    e = F.normalize(F.interpolate(e, size=image.shape[:2], mode="bilinear"), dim=1)[0].flatten(1)
    centre = F.normalize(e.median(dim=1).values, dim=0)
    return (1.0 - centre @ e).view(image.shape[:2])


def zero_shot(data: str, init: str, seed: int = 0) -> Dict[str, List[float]]:
    """{kind: [pixel AUC per tampered image]} of the weights ``init`` ("" = random init)."""
    saved = torch.load(SHIPPED_INIT.get(init, Path(init)), weights_only=True) if init else None
    default = saved or torch.load(SHIPPED_INIT["camera-trace"], weights_only=True)
    options, kind = default["model"], default["input_filter"]
    torch.manual_seed(seed)
    net = NCLNet(**options)
    if init:
        load_init(net, init, options, kind)
    net.eval()
    root = Path(data).parent
    meta = root / "meta.json"
    kinds = {m["image"]: m.get("kind", "?") for m in json.loads(meta.read_text())} if meta.is_file() else {}
    out: Dict[str, List[float]] = {}
    for image, mask in json.loads(Path(data).read_text()):
        if mask in (None, "Negative"):
            continue
        target = torch.from_numpy(read_mask(root / mask) > 0).flatten()
        score = distance_map(net, read_image(root / image), kind).flatten()
        out.setdefault(kinds.get(image, "?"), []).append(float(roc_auc(score, target)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a list.json of forgeries (meta.json beside it "
                   "gives the kinds)")
    p.add_argument("--init", default="camera-trace", help="weights file (default: the shipped)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| weights | " + " | ".join(("kind", "images", "pixel AUC")) + " |")
    print("|---|---|---|---|")
    for init in ("", args.init):
        for kind, aucs in sorted(zero_shot(args.data, init).items()):
            print(f"| {init or 'random init'} | {kind} | {len(aucs)} | {np.mean(aucs):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
