"""Pictures and reports, drawn with OpenCV (matplotlib is not a dependency).

- :func:`heatmap_overlay` — the probability map as a JET heat map blended over the image.
- :func:`binary_mask` — the thresholded map as a 0/255 PNG-ready array.
- :func:`panel` — image | ground truth | overlay | predicted mask, side by side, captioned.
- :func:`loss_curve` — the training loss of ``train_log.jsonl`` as a PNG (stages marked).
- :func:`write_report` — ``report.md``: metrics table, run facts, links to the pictures.

Images here are uint8 RGB [H, W, 3] (as :func:`fastiml.data.read_image` returns them); files are
written with :func:`write_png`, which converts to OpenCV's BGR.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

__all__ = ["heatmap_overlay", "binary_mask", "panel", "write_png", "read_log", "loss_curve",
           "write_report", "METRIC_ROWS"]

#: Rows of the report's metrics table: (key, label).
METRIC_ROWS = (
    ("pixel_f1", "pixel F1 (threshold 0.5)"),
    ("pixel_iou", "pixel IoU"),
    ("pixel_precision", "pixel precision"),
    ("pixel_recall", "pixel recall"),
    ("pixel_f1_best", "pixel F1, best threshold per image"),
    ("pixel_f1_permuted", "pixel F1, permuted"),
    ("pixel_auc", "pixel AUC"),
    ("image_auc", "image AUC"),
    ("image_acc", "image accuracy"),
)


def heatmap_overlay(img: np.ndarray, prob: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``img`` (uint8 RGB [H, W, 3]) with ``prob`` (float [H, W] in [0, 1]) as a JET heat map
    blended in with weight ``alpha``; uint8 RGB [H, W, 3]."""
    heat = cv2.applyColorMap(np.clip(prob * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = heat[..., ::-1]  # BGR -> RGB
    out = img.astype(np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def binary_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 [H, W]: 255 where ``prob > threshold`` (the metrics' rule), else 0."""
    return np.where(prob > threshold, 255, 0).astype(np.uint8)


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    h, w = tile.shape[:2]
    bar = np.full((18, w, 3), 255, np.uint8)
    scale = 0.4 if w >= 96 else 0.3
    cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, tile], 0)


def panel(img: np.ndarray, prob: np.ndarray, mask: Optional[np.ndarray] = None,
          threshold: float = 0.5, title: str = "") -> np.ndarray:
    """Side-by-side tiles (uint8 RGB): image, ground truth (if ``mask`` is given), heat-map
    overlay, predicted mask; captioned, with the predicted mask's outline drawn on the overlay."""
    over = heatmap_overlay(img, prob)
    pred = binary_mask(prob, threshold)
    contours, _ = cv2.findContours(pred, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(over, contours, -1, (255, 255, 255), 1)
    tiles = [_caption(img, title or "image")]
    if mask is not None:
        gt = np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
        tiles.append(_caption(gt, "ground truth"))
    tiles.append(_caption(over, "probability"))
    tiles.append(_caption(np.repeat(pred[..., None], 3, axis=2), f"mask (> {threshold:g})"))
    sep = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row: List[np.ndarray] = []
    for t in tiles:
        row += [t, sep]
    return np.concatenate(row[:-1], 1)


def write_png(path: str, img: np.ndarray) -> None:
    """Write a uint8 RGB [H, W, 3] or grey [H, W] array as PNG; OSError when it fails."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = img[..., ::-1] if img.ndim == 3 else img
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(data))
    if not ok:
        raise OSError(f"could not encode a PNG for {path}")
    buf.tofile(path)


def read_log(path: str) -> List[Dict]:
    """The training records (those with a ``step`` and a ``loss``) of a train_log.jsonl."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" not in r and "step" in r and "loss" in r:
                records.append(r)
    return records


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(t)
        t += step
    return ticks


def loss_curve(log_path: str, out_png: str, size=(720, 400), title: str = "training loss") -> bool:
    """Draw the loss of ``log_path`` (train_log.jsonl) against the step into ``out_png``.

    The logged points are drawn as a thin line, a centred moving average as a thick one;
    stage changes are dashed vertical lines. Returns False (and writes nothing) without records.
    """
    recs = read_log(log_path)
    pts = [(r["step"], r["loss"]) for r in recs
           if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not pts:
        return False
    w, h = size
    left, right, top, bottom = 64, 16, 30, 40
    img = np.full((h, w, 3), 255, np.uint8)
    steps = np.array([p[0] for p in pts], np.float64)
    losses = np.array([p[1] for p in pts], np.float64)
    x0, x1 = 0.0, max(float(steps.max()), 1.0)
    y0, y1 = float(losses.min()), float(losses.max())
    if len(losses) >= 20:  # the first steps' loss can dwarf the rest: scale to the bulk
        y1 = min(y1, y0 + 1.5 * (float(np.percentile(losses, 98)) - y0))
    pad = 0.05 * (y1 - y0 if y1 > y0 else max(abs(y1), 1.0))
    y0, y1 = y0 - pad, y1 + pad

    def to_px(sx, sy):
        px = left + (sx - x0) / (x1 - x0) * (w - left - right)
        py = top + (y1 - min(sy, y1)) / (y1 - y0) * (h - top - bottom)
        return int(round(px)), int(round(py))

    grey, dark = (225, 225, 225), (60, 60, 60)
    for t in _nice_ticks(y0, y1):
        _, py = to_px(x0, t)
        cv2.line(img, (left, py), (w - right, py), grey, 1)
        cv2.putText(img, f"{t:.3g}", (4, py + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, dark, 1, cv2.LINE_AA)
    for t in _nice_ticks(x0, x1):
        px, _ = to_px(t, y0)
        cv2.line(img, (px, top), (px, h - bottom), grey, 1)
        cv2.putText(img, f"{int(t)}", (px - 10, h - bottom + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    dark, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), dark, 1)
    # Stage changes.
    prev = None
    for r in recs:
        st = r.get("stage")
        if prev is not None and st != prev:
            px, _ = to_px(r["step"], y0)
            for yy in range(top, h - bottom, 8):
                cv2.line(img, (px, yy), (px, min(yy + 4, h - bottom)), (150, 150, 150), 1)
            cv2.putText(img, str(st), (px + 3, top + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, dark, 1,
                        cv2.LINE_AA)
        prev = st
    raw = np.array([to_px(s, v) for s, v in pts], np.int32)
    cv2.polylines(img, [raw], False, (246, 190, 140), 1, cv2.LINE_AA)  # light blue (BGR)
    if len(pts) <= 60:  # few points: mark each one
        for p in raw:
            cv2.circle(img, (int(p[0]), int(p[1])), 2, (246, 190, 140), -1, cv2.LINE_AA)
    half = len(pts) // 50  # a centred moving average over ~2 % of the points
    vals = [v for _, v in pts]
    smooth = [to_px(pts[i][0], float(np.mean(vals[max(0, i - half): i + half + 1])))
              for i in range(len(pts))]
    cv2.polylines(img, [np.array(smooth, np.int32)], False, (180, 80, 20), 2, cv2.LINE_AA)
    cv2.putText(img, title, (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, dark, 1, cv2.LINE_AA)
    cv2.putText(img, "step", (w // 2, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.42, dark, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)  # drawn in BGR already
    if not ok:
        raise OSError(f"could not encode {out_png}")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    buf.tofile(out_png)
    return True


def _cell(x, fmt: str = ".4f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else format(x, fmt)
    return str(x)


def write_report(path: str, metrics: Dict, *, title: str = "fastiml report",
                 facts: Optional[Dict[str, object]] = None, columns: Optional[Dict[str, Dict]] = None,
                 images: Sequence[str] = (), notes: Sequence[str] = ()) -> None:
    """Write ``report.md``.

    Args:
        metrics: the main metrics dict (a column "value"), or use ``columns`` for several
            ({column title: metrics dict}).
        facts: "key: value" lines shown under the table (method, steps, wall time, ...).
        images: paths (relative to the report) shown as pictures.
        notes: free paragraphs at the end.
    """
    cols = columns if columns else {"value": metrics}
    lines = [f"# {title}", "", "| metric | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for key, label in METRIC_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(c.get(key)) for c in cols.values()) + " |")
    counts = next(iter(cols.values()))
    if "n_tampered" in counts:
        lines += ["", f"Held-out images: {counts.get('n_tampered')} tampered, "
                  f"{counts.get('n_authentic')} authentic. Pixel metrics are averaged over tampered "
                  f"images; image-level metrics score an image by the map's "
                  f"{metrics.get('image_score', 'max')} (eval.image_score)."]
    if facts:
        lines += ["", "| | |", "|---|---|"]
        lines += [f"| {k} | {_cell(v, '.4g')} |" for k, v in facts.items()]
    for img in images:
        lines += ["", f"![{os.path.basename(img)}]({img})"]
    for n in notes:
        lines += ["", n]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
