"""Accuracy benchmark: NCL, BCE and MPC trained with the same budget, with and without the
camera-trace stage, scored per forgery kind on (a) the synthetic held-out split, (b) forgeries of
real photographs made by fastiml's own forging code (benchmarks/photo_sets.py's ``opencv`` set)
and (c) forgeries of the same photographs made by other code (benchmarks/independent_sets.py:
OpenCV's Poisson cloning and inpainting), two seeds each for the spread. Neither photo set's
photographs are ever trained on. Each set's "all tampered" floor (every pixel predicted
tampered) is printed beside it.

    python -m benchmarks.bench_accuracy --minutes 10                # the README's table
    python -m benchmarks.bench_accuracy --minutes 4 --n-train 800 --methods ncl bce --seeds 0
    python -m benchmarks.bench_accuracy --steps 400 --minutes 60    # equal steps instead of time
    python -m benchmarks.bench_accuracy --variants scratch trace     # camera-trace stage or not
    python -m benchmarks.bench_accuracy --copy-move off              # the networks' maps alone

Each run is ``fastiml demo`` (its config, data and schedule; ``--set`` passes overrides on)
followed by ``fastiml eval`` on every set; the photo sets are built first when missing (apt
packages, see photo_sets.py). Results: ``OUT/results.json`` and a markdown table on stdout. On a
shared machine a time budget buys fewer steps: ``--steps`` makes runs comparable (the step counts
are in the table either way), and ``uptime``'s load is printed with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks import harness as H

REPO = Path(__file__).resolve().parents[1]
KIND_ORDER = ("splice", "copymove", "inpaint")
SETS = ("synthetic", "photos", "independent")
#: variant name -> demo overrides; "trace" starts from the shipped camera-trace weights
VARIANTS = {"scratch": ["train.init="], "trace": ["train.init=camera-trace"]}


def _run(cmd: List[str], log: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"bench_accuracy: {' '.join(cmd[:4])} ... failed (status {rc}); see {log}")


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "n/a"


def _summary(metrics: Dict) -> Dict:
    out = {"pixel_f1": metrics["pixel_f1"], "pixel_auc": metrics["pixel_auc"],
           "image_auc": metrics.get("image_auc")}
    for kind, m in metrics.get("by_kind", {}).items():
        out[f"{kind}_f1"], out[f"{kind}_auc"] = m["pixel_f1"], m["pixel_auc"]
    return out


def all_tampered_f1(list_json: str) -> float:
    """Pixel F1 of predicting every pixel tampered, averaged over the tampered images of a list
    (per image 2m / (m + 1), m the mask's area fraction): the floor a localiser must beat."""
    import numpy as np

    from fastiml.data import read_mask

    root, f1 = Path(list_json).parent, []
    for _, mask in json.loads(Path(list_json).read_text()):
        if mask and mask != "Negative":
            m = float((read_mask(root / mask) > 0).mean())
            f1.append(2 * m / (m + 1))
    return float(np.mean(f1))


def run_one(method: str, variant: str, seed: int, args, data: Dict[str, str]) -> Dict:
    name = f"{method}_{variant}_s{seed}"
    out, log = Path(args.out) / name, Path(args.out) / f"{name}.log"
    demo = [sys.executable, "-m", "fastiml", "demo", "--out", str(out), "--method", method,
            "--seed", str(seed), "--minutes", str(args.minutes)]
    if args.n_train:
        demo += ["--n-train", str(args.n_train)]
    sets = VARIANTS[variant] + list(args.set)
    if args.steps:
        sets.append(f"train.steps={args.steps}")
    for s in sets:
        demo += ["--set", s]
    load_before = _load()
    _run(demo, log)
    demo_metrics = json.loads((out / "metrics.json").read_text())
    row = {"method": method, "variant": variant, "seed": seed,
           "steps": demo_metrics["train_steps"], "train_s": demo_metrics["train_s"],
           "load": load_before}
    data = dict(data, synthetic=str(out / "data" / "test" / "list.json"))
    for name in SETS:
        ev = out / f"eval_{name}"
        cmd = [sys.executable, "-m", "fastiml", "eval", "--checkpoint", str(out / "model.pt"),
               "--data", data[name], "--out", str(ev), "--workers", "0"]
        if args.resolution:
            cmd += ["--resolution", args.resolution]
        if args.copy_move:
            cmd += ["--copy-move", args.copy_move]
        _run(cmd, log)
        row[name] = _summary(json.loads((ev / "metrics.json").read_text()))
    return row


def table(rows: Sequence[Dict], floors: Dict[str, float]) -> str:
    head = ("| method | variant | seed | steps | set | pixel F1 | pixel AUC | image AUC | "
            + " | ".join(f"{k} F1 / AUC" for k in KIND_ORDER) + " |")
    lines = [head, "|" + "---|" * (8 + len(KIND_ORDER))]
    for r in rows:
        for name in SETS:
            m = r[name]
            kinds = " | ".join(f"{m.get(f'{k}_f1', float('nan')):.3f} / {m.get(f'{k}_auc', float('nan')):.3f}"
                               for k in KIND_ORDER)
            image_auc = "n/a" if m.get("image_auc") is None else f"{m['image_auc']:.3f}"
            lines.append(f"| {r['method']} | {r['variant']} | {r['seed']} | {r['steps']} | {name} | "
                         f"{m['pixel_f1']:.3f} | {m['pixel_auc']:.3f} | {image_auc} | {kinds} |")
    lines.append("")
    lines.append("all tampered (pixel F1 floor): " + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_accuracy_out")
    p.add_argument("--methods", nargs="+", default=["ncl", "bce", "mpc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, default=10.0, help="each demo's wall-clock budget")
    p.add_argument("--steps", type=int, default=0, help="> 0: train this many steps (equal steps)")
    p.add_argument("--n-train", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=sorted(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--photos", default="", help="folder of the photo sets (default: OUT/photos, "
                   "built with benchmarks.photo_sets and benchmarks.independent_sets)")
    p.add_argument("--resolution", choices=("native", "train"), default="")
    p.add_argument("--copy-move", choices=("keypoints", "off"), default="",
                   help="eval's --copy-move (default: the checkpoint's eval.copy_move, keypoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    root = Path(args.photos or Path(args.out) / "photos")
    data = {"photos": str(root / "opencv" / "forgeries" / "list.json"),
            "independent": str(root / "independent" / "list.json")}
    if not os.path.isfile(data["photos"]):
        from benchmarks import photo_sets
        photo_sets.main(["--out", str(root), "--sets", "opencv"])
    if not os.path.isfile(data["independent"]):
        from benchmarks import independent_sets
        independent_sets.main(["--out", str(root)])
    floors = {name: all_tampered_f1(path) for name, path in data.items()}
    rows = []
    for method in args.methods:
        for variant in args.variants:
            for seed in args.seeds:
                rows.append(run_one(method, variant, seed, args, data))
                with open(Path(args.out) / "results.json", "w") as f:
                    json.dump({"rows": rows, "all_tampered_f1": floors}, f, indent=2)
                r = rows[-1]
                print(f"{method} {variant} seed {seed}: {r['steps']} steps, pixel F1 "
                      + ", ".join(f"{k} {r[k]['pixel_f1']:.3f}" for k in SETS), flush=True)
    print(f"load average now {_load()}; CPU kernels: {H.cpu_levels()}")
    print(table(rows, floors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
