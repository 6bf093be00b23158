"""The ``fastiml`` command (also ``python -m fastiml``).

    fastiml train    --config C [--set section.key=value ...] [--resume CKPT]
    fastiml eval     --checkpoint CKPT --data PATH --out DIR [--robustness] [--resolution native|train]
    fastiml predict  --checkpoint CKPT --input FILE_OR_DIR [...] --out DIR [--threshold 0.5]
                     [--resolution native|train]
    fastiml synth    --out DIR --n N [--size S] [--seed K] [--source DIR]
    fastiml demo     --out DIR [--method ncl|bce|mpc] [--minutes M]
    fastiml bench    [NAME ...] [-- ARGS]
    fastiml selftest [ARGS]

Every bad input (missing path, bad config key, unknown method, unreadable image, a file that is
not a fastiml checkpoint, ...) ends the command with exactly one line ``fastiml: error: ...`` on
stderr and a non-zero exit status (2). Set ``FASTIML_DEBUG=1`` to get the traceback instead.
A training run that diverges (non-finite loss, see ``train.max_nonfinite_steps``) exits with 2; one
stopped by SIGINT / SIGTERM saves ``checkpoints/last.pt``, prints how to resume and exits with
128 + the signal number (130, 143).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

EXIT_ERROR = 2
DEMO_METHODS = ("ncl", "bce", "mpc")


class CLIError(Exception):
    """A user error: printed as one ``fastiml: error:`` line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage block)."""

    def error(self, message):  # noqa: D401 - argparse's hook
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _err(msg: str) -> None:
    sys.stderr.write(f"fastiml: error: {msg}\n")
    sys.stderr.flush()


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError):  # str(KeyError) is the repr of the key
        text = f"missing key {text}"
    first = text.splitlines()[0] if text else ""
    return first or type(e).__name__


def _showwarning(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()
    sys.stderr.write(f"fastiml: warning: {text[0] if text else category.__name__}\n")


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastiml", description="Contrastive image manipulation localization "
                "(NCL, MPC) with fused pixel-contrast kernels.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a method from a TOML config")
    t.add_argument("--config", help="TOML config (optional with --resume: the checkpoint's own)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    t.add_argument("--resume", metavar="CKPT", help="continue training from this checkpoint")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a data set")
    e.add_argument("--checkpoint", required=True, metavar="CKPT")
    e.add_argument("--data", required=True, metavar="PATH",
                   help="a JSON list of [image, mask] pairs or a Tp/Gt(/Au) folder")
    e.add_argument("--out", required=True, metavar="DIR", help="writes DIR/metrics.json")
    e.add_argument("--robustness", action="store_true",
                   help="also sweep the robustness protocol (JPEG, blur, noise, resize)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=int, default=2)
    _resolution_options(e)

    pr = sub.add_parser("predict", help="predict masks for images (heat-map overlays + masks)")
    pr.add_argument("--checkpoint", required=True, metavar="CKPT")
    pr.add_argument("--input", required=True, nargs="+", metavar="FILE_OR_DIR",
                    help="image files and/or folders of images")
    pr.add_argument("--out", required=True, metavar="DIR")
    pr.add_argument("--threshold", type=float, default=0.5)
    pr.add_argument("--device", default="auto")
    _resolution_options(pr)

    s = sub.add_parser("synth", help="write a synthetic forgery data set")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--n", required=True, type=int, help="number of images")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--source", metavar="DIR", help="authentic images to forge (default: procedural)")
    s.add_argument("--authentic-fraction", type=float, default=0.2)

    d = sub.add_parser("demo", help="synthesize data, train on the CPU, evaluate, report")
    d.add_argument("--out", required=True, metavar="DIR")
    d.add_argument("--method", default="ncl", choices=DEMO_METHODS)
    d.add_argument("--minutes", type=float, default=9.0,
                   help="total wall-clock budget, data synthesis and evaluation included")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-train", type=int, default=0, help="training images (0 = the config's)")
    d.add_argument("--n-test", type=int, default=0, help="held-out images (0 = the config's)")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo's training config")

    pt = sub.add_parser("pretrain-trace", help="camera-trace stage: pixel SupCon on source "
                        "mosaics of real photographs; writes weights that train.init starts from")
    pt.add_argument("--photos", required=True, nargs="+", metavar="DIR",
                    help="folders of real photographs (python -m benchmarks.photo_sets makes some)")
    pt.add_argument("--out", required=True, metavar="FILE", help="the weights file to write")
    pt.add_argument("--minutes", type=float, default=30.0)
    pt.add_argument("--config", help="TOML config whose method.model and data.input_filter the "
                    "weights are for (default: the demo's, fastiml/configs/demo.toml)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--threads", type=int, default=2)

    b = sub.add_parser("bench", help="run benchmarks (python -m benchmarks.bench_NAME)")
    b.add_argument("names", nargs="*", metavar="NAME")

    sub.add_parser("selftest", help="check the kernels against the references on this machine "
                   "(fastiml selftest --help for its options)", add_help=False)
    return p


def _resolution_options(p) -> None:
    p.add_argument("--resolution", choices=("native", "train"), default="",
                   help="native: the image's own pixels, tiled above --max-pixels; train: resized "
                   "as in training (default: the checkpoint's eval.resolution)")
    p.add_argument("--max-pixels", type=int, default=0, help="native: one pass up to this many "
                   "pixels, tiles above (default: the checkpoint's eval.max_pixels)")
    p.add_argument("--tile", type=int, default=0, help="native: tile side (default: eval.tile)")
    p.add_argument("--copy-move", choices=("keypoints", "off"), default="",
                   help="keypoints: fuse the copies found by matching the image with itself "
                   "(fastiml.copy_move) into the map; off: the network's map alone (default: the "
                   "checkpoint's eval.copy_move, else keypoints)")


def _version() -> str:
    from fastiml import __version__
    return f"fastiml {__version__}"


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def _require_path(path: str, what: str, kind: str = "any") -> str:
    if not os.path.exists(path):
        raise CLIError(f"{what} not found: {path}")
    if kind == "dir" and not os.path.isdir(path):
        raise CLIError(f"{what} must be a folder: {path}")
    if kind == "file" and not os.path.isfile(path):
        raise CLIError(f"{what} must be a file: {path}")
    return path


def _writable_dir(path: str, what: str = "output folder") -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{what} exists and is not a folder: {path}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path


def cmd_train(args) -> int:
    if not args.config and not args.resume:
        raise CLIError("train needs --config C (or --resume CKPT to continue a run)")
    if args.config:
        _require_path(args.config, "config file", "file")
    if args.resume:
        _require_path(args.resume, "checkpoint", "file")
    from fastiml.engine import load_checkpoint, load_config, train

    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        state = load_checkpoint(args.resume)
        cfg = load_config(None, args.overrides, base=state["config"])
    if args.resume:
        load_checkpoint(args.resume)  # a clear error before any work
    elif os.environ.get("RANK", "0") == "0":  # under torchrun, other ranks must find the files
        _add_source_forgeries(cfg, seed=cfg["train"]["seed"])
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        _print(f"checkpoint: {result['checkpoint']}")
        _print(f"steps: {result['steps']}, training time {result['train_s']:.1f} s, "
               f"{result['imgs_per_s']:.2f} img/s, data-wait fraction "
               f"{result['data_wait_fraction']:.3f}")
        for split, m in result["metrics"].items():
            _print(f"{split}: " + _metric_line(m))
    return 0


def _add_source_forgeries(cfg: Dict, seed: int) -> None:
    """data.source_dir: forge data.source_n photo-style images from that folder of photographs
    (under output.dir/data/source) and add them to data.train (or make them data.train)."""
    src = cfg["data"].get("source_dir", "")
    if not src:
        return
    _require_path(src, "data.source_dir", "dir")
    from fastiml.data import synthesize

    n = int(cfg["data"]["source_n"])
    if n < 1:
        raise CLIError(f"data.source_n must be >= 1 with data.source_dir, got {n}")
    out = os.path.join(cfg["output"]["dir"], "data", "source")
    t0 = time.perf_counter()
    r = synthesize(out, n, size=cfg["data"]["size"], seed=10_000 + seed, source_dir=src,
                   style="photo")
    _print(f"[data] {n} forgeries from the photographs in {src} in "
           f"{time.perf_counter() - t0:.1f} s: {r['json']}")
    train = cfg["data"]["train"]
    train = [] if train in ("", []) else (list(train) if isinstance(train, list) else [train])
    cfg["data"]["train"] = train + [r["json"]] if train else r["json"]
    cfg["data"]["source_dir"] = ""  # done: a resumed run must not forge again


def _demo_photos() -> Path:
    """demo.photos: the 60 training photographs (fetched once from Debian packages)."""
    from fastiml.data.photos import PhotoFetchError, training_photos

    try:
        return training_photos(log=_print)
    except PhotoFetchError as e:
        raise CLIError(f"the demo trains on real photographs fetched from Debian packages "
                       f"(fastiml.data.photos), and this machine could not fetch them: {e}. "
                       f"Give it a folder of your own photographs with --set data.source_dir=DIR, "
                       f"or train on procedural images only with --set demo.photos=false") from None


def _metric_line(m: Dict) -> str:
    keys = ("pixel_f1", "pixel_iou", "pixel_auc", "image_auc", "image_acc")
    return ", ".join(f"{k} {_fmt(m.get(k))}" for k in keys)


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _load_model(path: str, device: str):
    import torch  # noqa: F401
    from fastiml.engine import model_from_checkpoint
    from fastiml.engine.distributed import resolve_device

    _require_path(path, "checkpoint", "file")
    dev = resolve_device(device)
    model, method, state = model_from_checkpoint(path, dev)
    return model, method, state, dev


def _tiling(state: Dict, args):
    """The checkpoint's [eval] table with the command line's --resolution/--max-pixels/--tile."""
    from fastiml.engine.inference import tiling_from_config

    ec = dict(state["config"].get("eval", {}))
    for key, value in (("max_pixels", args.max_pixels), ("tile", args.tile)):
        if value < 0:
            raise CLIError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        if value:
            ec[key] = value
    try:
        return tiling_from_config(ec, args.resolution)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _copy_move(state: Dict, args) -> str:
    """--copy-move, else the checkpoint's eval.copy_move."""
    from fastiml.engine.evaluate import copy_move_from_config

    if args.copy_move:
        return args.copy_move
    try:
        return copy_move_from_config(state["config"].get("eval", {}))
    except ValueError as e:
        raise CLIError(str(e)) from None


def _synth_kinds(data: str) -> Dict[str, str]:
    """{image path: forgery kind} from the meta.json that `fastiml synth` writes beside list.json."""
    folder = os.path.dirname(data) if os.path.isfile(data) else data
    meta = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta):
        return {}
    try:
        with open(meta, encoding="utf-8") as f:
            items = json.load(f)
        return {os.path.normpath(os.path.join(folder, it["image"])): str(it["kind"]) for it in items}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


PER_IMAGE_COLUMNS = ("file", "kind", "tampered", "pixel_f1", "pixel_iou", "pixel_auc",
                     "image_score", "height", "width")


def cmd_eval(args) -> int:
    import csv

    from fastiml.data import ForgeryDataset
    from fastiml.engine import evaluate, robustness
    from fastiml.engine.evaluate import image_score_from_config
    from fastiml.engine.guards import skipped_files
    from fastiml.engine.progress import json_safe
    from fastiml.metrics import per_image_metrics

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must be in [0, 1], got {args.threshold}")
    _require_path(args.checkpoint, "checkpoint", "file")
    _require_path(args.data, "data set")
    model, method, state, dev = _load_model(args.checkpoint, args.device)
    out = _writable_dir(args.out)
    dc = state["config"]["data"]
    amp = state["config"]["train"].get("amp", "off")
    tiling = _tiling(state, args)
    mode = "native" if tiling is not None else dc["mode"]  # native: images differ in size
    copy_move = _copy_move(state, args)
    ds = ForgeryDataset(args.data, size=dc["size"], mode=mode, copy_move=copy_move)
    score_kw = image_score_from_config(state["config"].get("eval", {}))
    kw = dict(batch_size=1 if tiling is not None else args.batch_size, device=dev, amp=amp,
              num_workers=max(0, args.workers), threshold=args.threshold,
              input_filter_kind=dc.get("input_filter", "none"), tiling=tiling, **score_kw)
    kinds, rows = _synth_kinds(args.data), []

    def per_image(batch, prob):  # the loader goes through ds in order (one process)
        for b in range(prob.shape[0]):
            img_path = ds.samples[len(rows)][0]
            r = per_image_metrics(prob[b, 0], batch["mask"][b], batch["valid"][b], args.threshold,
                                  **score_kw)
            kind = kinds.get(os.path.normpath(img_path), "" if r["tampered"] else "authentic")
            rows.append([os.path.relpath(img_path, os.path.dirname(os.path.abspath(args.data))
                                         if os.path.isfile(args.data) else args.data),
                         kind, int(r["tampered"])]
                        + [_csv_num(r.get(k)) for k in ("f1", "iou", "auc", "score")]
                        + [int(v) for v in batch["size"][b]])

    metrics = evaluate(model, method, ds, on_batch=per_image, **kw)
    result = dict(metrics)
    result["skipped"] = skipped_files(ds)  # pairs the data set could not read
    result.update(checkpoint=os.path.abspath(args.checkpoint), data=os.path.abspath(args.data),
                  method=state["method"]["name"], size=dc["size"], mode=dc["mode"],
                  resolution="native" if tiling is not None else "train",
                  threshold=args.threshold, copy_move=copy_move)
    by_kind = _metrics_by_kind(rows)
    if by_kind:
        result["by_kind"] = by_kind
    _print(f"{len(ds)} images ({result['resolution']} resolution"
           + (", copy-move matching fused" if copy_move != "off" else "") + "): "
           + _metric_line(metrics)
           + (f" ({len(ds.skipped)} unreadable file(s) skipped, listed in metrics.json)"
              if ds.skipped else ""))
    for kind, m in by_kind.items():
        _print(f"  {kind} ({m['n']} images): pixel_f1 {_fmt(m['pixel_f1'])}, "
               f"pixel_auc {_fmt(m['pixel_auc'])}")
    if args.robustness:
        result["robustness"] = robustness(model, method, args.data, size=dc["size"],
                                          mode=mode, copy_move=copy_move, log=_print, **kw)
    path = os.path.join(out, "metrics.json")
    with open(path, "w", encoding="utf-8") as f:  # standard JSON: NaN (e.g. one class) -> null
        json.dump(json_safe(result), f, indent=2, allow_nan=False)
    with open(os.path.join(out, "per_image.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PER_IMAGE_COLUMNS)
        w.writerows(rows)
    _print(f"wrote {path} and per_image.csv")
    return 0


def _csv_num(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def _metrics_by_kind(rows: List[list]) -> Dict[str, Dict]:
    """Mean pixel F1 / AUC of the tampered images of each forgery kind (per_image.csv's rows)."""
    out: Dict[str, Dict] = {}
    for kind in sorted({r[1] for r in rows if r[2] and r[1]}):
        sel = [r for r in rows if r[1] == kind and r[2]]
        f1 = [float(r[3]) for r in sel]
        auc = [float(r[5]) for r in sel if r[5] != ""]
        out[kind] = {"n": len(sel), "pixel_f1": sum(f1) / len(f1),
                     "pixel_auc": sum(auc) / len(auc) if auc else float("nan")}
    return out


def _list_images(path: str) -> List[str]:
    from fastiml.data import IMAGE_EXTENSIONS

    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                       and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise CLIError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder: {path}")
        return files
    raise CLIError(f"input not found: {path}")


def cmd_predict(args) -> int:
    from fastiml.data import read_image
    from fastiml.engine import predict_image
    from fastiml.engine.report import binary_mask, heatmap_overlay, write_png

    if not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must be in [0, 1], got {args.threshold}")
    _require_path(args.checkpoint, "checkpoint", "file")
    files = [f for item in args.input for f in _list_images(item)]
    model, method, state, dev = _load_model(args.checkpoint, args.device)
    out = _writable_dir(args.out)
    dc = state["config"]["data"]
    amp = state["config"]["train"].get("amp", "off")
    tiling = _tiling(state, args)
    copy_move = _copy_move(state, args)
    failed = []
    for path, stem in zip(files, _output_stems(files)):
        try:
            img = read_image(path)  # ValueError naming the file when it cannot be decoded
        except ValueError as e:  # carry on with the others; the exit status reports it
            sys.stderr.write(f"fastiml: warning: skipped {path}: {_one_line(e)}\n")
            failed.append(_one_line(e))
            continue
        prob = predict_image(model, method, img, size=dc["size"], mode=dc["mode"], device=dev,
                             amp=amp, input_filter_kind=dc.get("input_filter", "none"),
                             tiling=tiling, copy_move=copy_move)
        write_png(os.path.join(out, f"{stem}_overlay.png"), heatmap_overlay(img, prob))
        write_png(os.path.join(out, f"{stem}_mask.png"), binary_mask(prob, args.threshold))
        _print(f"{path}: max probability {float(prob.max()):.3f}, "
               f"{100.0 * float((prob > args.threshold).mean()):.1f}% of pixels above "
               f"{args.threshold:g}")
    _print(f"wrote {2 * (len(files) - len(failed))} PNG files to {out}")
    if failed:
        raise CLIError(f"{len(failed)} of {len(files)} input(s) could not be read, the first: "
                       f"{failed[0]}")
    return 0


def _output_stems(files: Sequence[str]) -> List[str]:
    """One distinct output name per input: its stem, or where stems collide (a.png and a.jpg)
    stem_extension, and where even those collide (dir1/a.png and dir2/a.png) a numbered suffix."""
    stems = [Path(f).stem for f in files]
    names = [s if stems.count(s) == 1 else f"{s}_{Path(f).suffix.lstrip('.').lower()}"
             for s, f in zip(stems, files)]
    seen: Dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n}_{seen[n]}")
    return unique


def cmd_synth(args) -> int:
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if args.size < 8:
        raise CLIError(f"--size must be >= 8, got {args.size}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.source:
        _require_path(args.source, "source folder", "dir")
    _writable_dir(args.out)
    from fastiml.data import synthesize

    t0 = time.perf_counter()
    r = synthesize(args.out, args.n, size=args.size, seed=args.seed, source_dir=args.source,
                   authentic_fraction=args.authentic_fraction)
    counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
    _print(f"wrote {r['n_images']} images ({counts}) to {r['out_dir']} in "
           f"{time.perf_counter() - t0:.1f} s; list: {r['json']}")
    return 0


def cmd_pretrain_trace(args) -> int:
    if not args.minutes > 0:
        raise CLIError(f"--minutes must be > 0, got {args.minutes}")
    for folder in args.photos:
        _require_path(folder, "photo folder", "dir")
    from fastiml.engine import load_config
    from fastiml.engine.pretrain import pretrain_trace

    cfg = load_config(args.config or _demo_config_path("ncl"))
    command = "fastiml " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["pretrain-trace"] else ""
    pretrain_trace(args.photos, args.out, minutes=args.minutes, model=cfg["method"].get("model"),
                   input_filter=cfg["data"]["input_filter"], seed=args.seed,
                   threads=args.threads, command=command, log=_print)
    return 0


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cmd_bench(args, extra: Sequence[str]) -> int:
    root = _repo_root()
    folder = root / "benchmarks"
    if not (folder / "__init__.py").is_file():
        raise CLIError(f"the benchmarks folder is not there ({folder}); benchmarks ship with the "
                       "source checkout, not with the installed package: run from a clone")
    available = sorted(p.stem[len("bench_"):] for p in folder.glob("bench_*.py"))
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise CLIError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(available)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    status = 0
    for n in names:
        cmd = [sys.executable, "-m", f"benchmarks.bench_{n}", *extra]
        _print("$ " + " ".join(cmd))
        rc = subprocess.call(cmd, cwd=str(root), env=env)
        if rc != 0:
            _err(f"benchmark {n} exited with status {rc}")
            status = rc
    return status


def cmd_selftest(argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module("fastiml.selftest")
    except ModuleNotFoundError as e:
        if e.name == "fastiml.selftest":
            raise CLIError("fastiml.selftest is not available in this installation") from None
        raise
    fn = getattr(mod, "main", None)
    if fn is None:
        raise CLIError("fastiml.selftest has no main()")
    params = inspect.signature(fn).parameters
    rc = fn(list(argv)) if params else fn()
    return int(rc or 0)


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------
def _demo_config_path(method: str) -> str:
    from importlib import resources

    base = resources.files("fastiml") / "configs"
    for name in (f"demo_{method}.toml", "demo.toml"):
        p = base / name
        if p.is_file():
            return str(p)
    raise CLIError(f"the demo configuration (fastiml/configs/demo.toml) is missing from this "
                   "installation")


#: Demo data: images per split when the config's [demo] table does not say (--n-train /
#: --n-test override both).
DEMO_N_TRAIN = 2000
DEMO_N_TEST = 200
DEMO_OVERLAYS = 8


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    if not args.minutes > 0:
        raise CLIError(f"--minutes must be > 0, got {args.minutes}")
    if args.n_train < 0 or args.n_test < 0:
        raise CLIError("--n-train and --n-test must be >= 0")
    import numpy as np
    import torch

    from fastiml.data import ForgeryDataset, read_image, read_mask, synthesize
    from fastiml.engine import load_config, predict_image, train
    from fastiml.engine.report import loss_curve, panel, write_png, write_report

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = os.path.abspath(_writable_dir(args.out))
    total_s = 60.0 * args.minutes
    path = _demo_config_path(args.method)
    cfg = load_config(path, [f"train.method={args.method}", f"output.dir={out}",
                             f"train.threads={args.threads}"] + list(args.overrides))
    demo = dict(cfg["demo"])
    size = cfg["data"]["size"]
    n_train = int(demo.pop("n_train", DEMO_N_TRAIN))
    n_test = int(demo.pop("n_test", DEMO_N_TEST))
    n_train, n_test = args.n_train or n_train, args.n_test or n_test
    synth_options = dict(demo.pop("synth", {}))
    photos = demo.pop("photos", False)
    if not isinstance(photos, bool):
        raise CLIError(f"demo.photos must be true or false, got {photos!r}")
    if demo:
        raise CLIError(f"unknown key(s) in [demo] of {path}: {', '.join(sorted(demo))}")

    # 1. Data: two synthetic splits from different seeds (different procedural scenes).
    train_dir, test_dir = os.path.join(out, "data", "train"), os.path.join(out, "data", "test")
    _print(f"[demo] synthesizing {n_train} training and {n_test} held-out images ({size}x{size}) "
           f"under {os.path.join(out, 'data')}")
    synthesize(train_dir, n_train, size=size, seed=2 * args.seed + 1, **synth_options)
    synthesize(test_dir, n_test, size=size, seed=2 * args.seed + 2, **synth_options)
    cfg["data"]["train"] = os.path.join(train_dir, "list.json")
    cfg["data"]["test"] = os.path.join(test_dir, "list.json")
    if photos and not cfg["data"]["source_dir"]:
        cfg["data"]["source_dir"] = str(_demo_photos())
    _add_source_forgeries(cfg, seed=args.seed)  # photographs mixed in (data.source_dir)
    t_data = time.perf_counter() - t0
    _print(f"[demo] data ready in {t_data:.1f} s")

    # 2. Train on what is left of the budget, keeping a reserve for evaluation and the report.
    reserve = 20.0 + 0.06 * n_test + 0.04 * total_s
    budget = total_s - (time.perf_counter() - t0) - reserve
    if budget < 10:
        raise CLIError(f"--minutes {args.minutes:g} leaves no time to train "
                       f"(data synthesis took {t_data:.0f} s); give it more minutes")
    cfg["train"]["time_budget_s"] = float(budget)
    cfg["train"]["seed"] = args.seed
    _print(f"[demo] training {args.method} on the CPU for {budget:.0f} s "
           f"(time-budgeted cosine schedule)")
    result = train(cfg)
    metrics = dict(result["metrics"]["test"])

    # 3. Report: loss curve, overlays, metrics.json, report.md.
    curve = os.path.join(out, "loss_curve.png")
    loss_curve(os.path.join(out, "train_log.jsonl"), curve, title=f"{args.method}: training loss")
    from fastiml.engine import model_from_checkpoint
    from fastiml.engine.evaluate import copy_move_from_config
    model, method, state = model_from_checkpoint(result["checkpoint"])
    test = ForgeryDataset(cfg["data"]["test"], size=size, mode=cfg["data"]["mode"], check="none")
    tampered = [s for s in test.samples if s[1] is not None]
    authentic = [s for s in test.samples if s[1] is None]
    picks = tampered[: DEMO_OVERLAYS - 2] + authentic[:2]
    overlay_dir = os.path.join(out, "overlays")
    os.makedirs(overlay_dir, exist_ok=True)
    overlay_files = []
    for img_path, mask_path in picks:
        img = read_image(img_path)
        mask = read_mask(mask_path) if mask_path else np.zeros(img.shape[:2], np.uint8)
        prob = predict_image(model, method, img, size=size, mode=cfg["data"]["mode"],
                             input_filter_kind=cfg["data"]["input_filter"],
                             copy_move=copy_move_from_config(cfg["eval"]))
        name = Path(img_path).stem + ("" if mask_path else "_authentic") + ".png"
        write_png(os.path.join(overlay_dir, name), panel(img, prob, mask, title=Path(img_path).name))
        overlay_files.append(os.path.join("overlays", name))
    total = time.perf_counter() - t0
    summary = dict(metrics)
    summary.update(method=args.method, train_steps=result["steps"],
                   train_s=round(result["train_s"], 1), total_s=round(total, 1),
                   data_synthesis_s=round(t_data, 1), imgs_per_s=round(result["imgs_per_s"], 3),
                   data_wait_fraction=round(result["data_wait_fraction"], 4),
                   n_train=n_train, n_test=n_test, size=size, threads=torch.get_num_threads(),
                   checkpoint=result["checkpoint"])
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    mc = cfg["method"].get("model", {})
    write_report(
        os.path.join(out, "report.md"), metrics,
        title=f"fastiml demo: {args.method} on synthetic forgeries",
        facts={"method": args.method, "network": ", ".join(f"{k}={v}" for k, v in mc.items()),
               "image size": f"{size} x {size}", "training images": n_train,
               "held-out images": n_test, "training steps": result["steps"],
               "batch size": cfg["train"]["batch_size"], "training time (s)": round(result["train_s"], 1),
               "total wall time (s)": round(total, 1), "throughput (img/s)": round(result["imgs_per_s"], 2),
               "data-wait fraction": round(result["data_wait_fraction"], 4),
               "CPU threads": torch.get_num_threads()},
        images=["loss_curve.png"] + overlay_files,
        notes=["The held-out split is synthesized from a different seed than the training split, "
               "so its scenes, camera traces and forgeries are all new to the network.",
               "Reproduce: `fastiml eval --checkpoint model.pt --data data/test/list.json --out eval` "
               "and `fastiml predict --checkpoint model.pt --input data/test/Tp --out predictions`."])
    _print(f"[demo] {args.method}: " + _metric_line(metrics))
    _print(f"[demo] {result['steps']} steps in {result['train_s']:.0f} s, "
           f"{result['imgs_per_s']:.2f} img/s, data-wait fraction "
           f"{result['data_wait_fraction']:.3f}; total {total:.0f} s")
    _print(f"[demo] wrote {out}/model.pt, metrics.json, report.md, loss_curve.png, overlays/")
    return 0


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _training_stops():
    """The exceptions that end a training run on purpose (not a bug: no traceback)."""
    if "fastiml.engine.guards" not in sys.modules:  # never imported: nothing can have raised them
        return ()
    from fastiml.engine.guards import TrainingDiverged, TrainingInterrupted
    return (TrainingInterrupted, TrainingDiverged)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fastiml`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if argv[:1] == ["bench"] and "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    debug = os.environ.get("FASTIML_DEBUG", "") not in ("", "0")
    # OpenCV logs decoder complaints to stderr itself; our error line says it once.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    old_showwarning = warnings.showwarning
    warnings.showwarning = _showwarning
    try:
        if argv[:1] == ["selftest"]:  # its own options, parsed by fastiml.selftest
            return cmd_selftest(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "synth":
            return cmd_synth(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "pretrain-trace":
            return cmd_pretrain_trace(args)
        if args.command == "bench":
            return cmd_bench(args, extra)
        raise CLIError(f"unknown command {args.command!r}")
    except KeyboardInterrupt:
        sys.stderr.write("\nfastiml: interrupted\n")
        return 130
    except _training_stops() as e:
        from fastiml.engine.guards import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):  # a resumable checkpoint was saved
            sys.stderr.write(f"fastiml: {e}\n")
            return 128 + e.signum
        _err(str(e))  # diverged
        return EXIT_ERROR
    except SystemExit:
        raise
    except CLIError as e:
        _err(str(e))
        return EXIT_ERROR
    except Exception as e:  # every other failure: one line, unless debugging
        if debug:
            raise
        from fastiml.engine.checkpoint import CheckpointError
        from fastiml.engine.config import ConfigError

        if isinstance(e, (ConfigError, CheckpointError, ValueError, FileNotFoundError,
                          PermissionError)):
            _err(_one_line(e))
        else:
            _err(f"{type(e).__name__}: {_one_line(e)} (set FASTIML_DEBUG=1 for the traceback)")
        return EXIT_ERROR
    finally:
        warnings.showwarning = old_showwarning


if __name__ == "__main__":
    sys.exit(main())
