"""Draws the benchmark results (``benchmarks/results.csv``) as PNG files.

For each benchmark, the latest run in the CSV (or the one given by ``--run TIMESTAMP``):

* ``pair_stats.png``  speed-up of the fused kernel over each baseline against N, time against N
  and peak memory above the inputs against N (log scales), one line per provider and dtype;
* ``contour.png``     time and peak memory of each provider, per op / patch;
* ``pivot.png``       time and peak memory of each provider, per dtype.

Needs matplotlib; without it, says so and exits 0 (the CSV and the tables are the results).

    python -m benchmarks.plot [--csv benchmarks/results.csv] [--out benchmarks/plots]
        [--run 2025-01-01T00:00:00+00:00]
"""
import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_CSV = Path(__file__).resolve().with_name("results.csv")
DEFAULT_OUT = Path(__file__).resolve().with_name("plots")


def load(path):
    """{benchmark: {timestamp: [(provider, params dict, metrics dict, status)]}}."""
    runs = defaultdict(lambda: defaultdict(dict))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["provider"], row["params"])
            entry = runs[row["benchmark"]][row["timestamp"]].setdefault(
                key, {"provider": row["provider"], "params": json.loads(row["params"]),
                      "metrics": {}, "status": "ok", "machine": row["machine"],
                      "commit": row["commit"]})
            if row["metric"] == "status":
                entry["status"] = row["value"]
            else:
                try:
                    entry["metrics"][row["metric"]] = float(row["value"])
                except ValueError:
                    pass
    return {b: {t: list(e.values()) for t, e in by_t.items()} for b, by_t in runs.items()}


def pick_run(runs_of_benchmark, wanted=None):
    if wanted is not None:
        return wanted, runs_of_benchmark.get(wanted)
    latest = max(runs_of_benchmark)  # ISO timestamps sort in time order
    return latest, runs_of_benchmark[latest]


def _title(plt, fig, benchmark, stamp, entries):
    e = entries[0]
    fig.suptitle(f"{benchmark} — {stamp} — commit {e['commit']}\n{e['machine']}", fontsize=8)


_COLORS = {"fused": "C0", "naive": "C1", "supcontrast": "C2", "pml": "C3"}


def plot_pair_stats(plt, entries, stamp, out):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    series = defaultdict(list)
    for e in entries:
        if e["status"] != "ok":
            continue
        p = e["params"]
        series[(e["provider"], p["dtype"])].append((p["N"], e["metrics"]))
    for (provider, dtype), points in sorted(series.items()):
        points.sort(key=lambda t: t[0])
        ns = [n for n, _ in points]
        style = "-" if dtype == "float32" else "--"
        color = _COLORS.get(provider)
        axes[1].plot(ns, [m["time_s"] for _, m in points], style, marker="o", color=color,
                     label=f"{provider} {dtype}")
        axes[2].plot(ns, [max(m.get("peak_above_inputs_mb", 0.0), 0.1) for _, m in points],
                     style, marker="o", color=color, label=f"{provider} {dtype}")
        if provider == "fused":
            for key in sorted({k for _, m in points for k in m if k.startswith("speedup_vs_")}):
                xs = [n for n, m in points if key in m]
                base = key[len("speedup_vs_"):]
                axes[0].plot(xs, [m[key] for _, m in points if key in m], style, marker="o",
                             color=_COLORS.get(base), label=f"vs {base} {dtype}")
            roof = [(n, m["roofline"]) for n, m in points if "roofline" in m]
            if roof:
                axes[0].plot([n for n, _ in roof], [1.0 / r for _, r in roof], style,
                             marker="x", color="grey", label=f"4·mm / fused {dtype}")
    axes[0].axhline(1.0, color="black", linewidth=0.5)
    for ax, title, ylabel in zip(axes, ("speed-up of fused (fwd + bwd)", "time (fwd + bwd)",
                                        "peak memory above inputs"),
                                 ("× (higher is better)", "seconds", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (embeddings)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _title(plt, fig, "pair_stats (SupCon, D = 128)", stamp, entries)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _bars(plt, entries, stamp, out, benchmark, group_of, providers):
    groups = []
    for e in entries:
        g = group_of(e)
        if g not in groups:
            groups.append(g)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        for ax, metric in zip(axes, ("time_s", "peak_above_inputs_mb")):
            xs, ys = [], []
            for j, g in enumerate(groups):
                for e in entries:
                    if e["provider"] == provider and group_of(e) == g and e["status"] == "ok":
                        xs.append(j + i * width)
                        ys.append(max(e["metrics"].get(metric, 0.0), 1e-2))
            ax.bar(xs, ys, width, label=provider)
    for ax, title in zip(axes, ("time (s)", "peak memory above inputs (MB, floor 0.01)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _title(plt, fig, benchmark, stamp, entries)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot benchmarks/results.csv to PNG files.")
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the PNG files")
    p.add_argument("--run", default=None, help="timestamp of the run to plot (default: latest)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plots were drawn "
              "(`pip install matplotlib` to get them); the results are in "
              f"{args.csv} and in the tables the benchmarks print.")
        return 0
    if not Path(args.csv).exists():
        print(f"no results file at {args.csv}: run a benchmark first, e.g. "
              "`python -m benchmarks.bench_pivot`")
        return 1
    runs = load(args.csv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for benchmark, by_time in sorted(runs.items()):
        stamp, entries = pick_run(by_time, args.run)
        if not entries:
            continue
        path = out / f"{benchmark}.png"
        if benchmark == "pair_stats":
            plot_pair_stats(plt, entries, stamp, path)
        elif benchmark == "contour":
            _bars(plt, entries, stamp, path, "contour (uint8 masks)",
                  lambda e: f"{e['params']['op']} "
                            + ", ".join(f"{k}={e['params'][k]}" for k in ("p", "r")
                                        if k in e["params"]),
                  ("fused", "reference", "float"))
        elif benchmark == "pivot":
            _bars(plt, entries, stamp, path, "pivot_consistency (fwd + bwd)",
                  lambda e: e["params"]["dtype"], ("fused", "reference"))
        elif benchmark == "ntxent":
            _bars(plt, entries, stamp, path, "NT-Xent (fwd + bwd)",
                  lambda e: f"N={e['params']['N']} {e['params']['labels']}", ("fastiml", "pml"))
        elif benchmark == "clip":
            _bars(plt, entries, stamp, path, "CLIP loss (fwd + bwd)",
                  lambda e: f"B={e['params']['B']}", ("fastiml", "open_clip"))
        else:
            continue
        written.append(str(path))
    print("\n".join(f"wrote {w}" for w in written) or "nothing to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
