"""Accuracy benchmark: NCL, BCE and MPC trained with the same budget, scored per forgery kind on
(a) the synthetic held-out split and (b) forgeries made from real photographs that the training
never saw (benchmarks/photo_sets.py's ``opencv`` set), two seeds each for the spread.

    python -m benchmarks.bench_accuracy --minutes 10                # the README's table
    python -m benchmarks.bench_accuracy --minutes 4 --n-train 800 --methods ncl bce --seeds 0
    python -m benchmarks.bench_accuracy --steps 400 --minutes 60    # equal steps instead of time

Each run is ``fastiml demo`` (its config, data and schedule; ``--set`` passes overrides on)
followed by ``fastiml eval`` on both sets; the photo set is built first when missing (apt
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


def run_one(method: str, seed: int, args, photos: str) -> Dict:
    out = Path(args.out) / f"{method}_s{seed}"
    log = Path(args.out) / f"{method}_s{seed}.log"
    demo = [sys.executable, "-m", "fastiml", "demo", "--out", str(out), "--method", method,
            "--seed", str(seed), "--minutes", str(args.minutes)]
    if args.n_train:
        demo += ["--n-train", str(args.n_train)]
    sets = list(args.set)
    if args.steps:
        sets.append(f"train.steps={args.steps}")
    for s in sets:
        demo += ["--set", s]
    load_before = _load()
    _run(demo, log)
    demo_metrics = json.loads((out / "metrics.json").read_text())
    row = {"method": method, "seed": seed, "steps": demo_metrics["train_steps"],
           "train_s": demo_metrics["train_s"], "load": load_before}
    for name, data in (("synthetic", out / "data" / "test" / "list.json"), ("photos", photos)):
        ev = out / f"eval_{name}"
        cmd = [sys.executable, "-m", "fastiml", "eval", "--checkpoint", str(out / "model.pt"),
               "--data", str(data), "--out", str(ev), "--workers", "0"]
        if args.resolution:
            cmd += ["--resolution", args.resolution]
        _run(cmd, log)
        row[name] = _summary(json.loads((ev / "metrics.json").read_text()))
    return row


def table(rows: Sequence[Dict]) -> str:
    head = ("| method | seed | steps | set | pixel F1 | pixel AUC | "
            + " | ".join(f"{k} F1 / AUC" for k in KIND_ORDER) + " |")
    lines = [head, "|" + "---|" * (5 + len(KIND_ORDER) + 1)]
    for r in rows:
        for name in ("synthetic", "photos"):
            m = r[name]
            kinds = " | ".join(f"{m.get(f'{k}_f1', float('nan')):.3f} / {m.get(f'{k}_auc', float('nan')):.3f}"
                               for k in KIND_ORDER)
            lines.append(f"| {r['method']} | {r['seed']} | {r['steps']} | {name} | "
                         f"{m['pixel_f1']:.3f} | {m['pixel_auc']:.3f} | {kinds} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_accuracy_out")
    p.add_argument("--methods", nargs="+", default=["ncl", "bce", "mpc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, default=10.0, help="each demo's wall-clock budget")
    p.add_argument("--steps", type=int, default=0, help="> 0: train this many steps (equal steps)")
    p.add_argument("--n-train", type=int, default=0)
    p.add_argument("--photos", default="", help="list.json of photo forgeries (default: build "
                   "OUT/photos with benchmarks.photo_sets)")
    p.add_argument("--resolution", choices=("native", "train"), default="")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    photos = args.photos
    if not photos:
        photos = str(Path(args.out) / "photos" / "opencv" / "forgeries" / "list.json")
        if not os.path.isfile(photos):
            from benchmarks import photo_sets
            photo_sets.main(["--out", str(Path(args.out) / "photos"), "--sets", "opencv"])
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            rows.append(run_one(method, seed, args, photos))
            with open(Path(args.out) / "results.json", "w") as f:
                json.dump(rows, f, indent=2)
            print(f"{method} seed {seed}: {rows[-1]['steps']} steps, photos pixel F1 "
                  f"{rows[-1]['photos']['pixel_f1']:.3f}, synthetic {rows[-1]['synthetic']['pixel_f1']:.3f}",
                  flush=True)
    print(f"load average now {_load()}; CPU kernels: {H.cpu_levels()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
