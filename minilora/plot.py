"""Loss curves from training runs: train and validation loss (and accuracy) of several runs on one chart.

    python -m minilora.plot out/quickstart/runs/sql out/quickstart/runs/sql-full      # -> loss.png
    python -m minilora.plot out/a out/b --out compare.png

Each argument is a train.py output directory; its log.jsonl has one record per logged step
({"step", "loss", ...}) and one per evaluation ({"step", "val_loss", "accuracy", ...}).

Pictures need matplotlib, an optional extra (`pip install -e ".[plot]"`). Without it the command
prints each run's figures as a table and says how to get the chart; nothing else changes.
"""

import argparse
import json
import math
import os
import sys

from minilora.cli import main_guard
from minilora.errors import MiniloraError
from minilora.fileio import atomic_open

PLOT_HINT = 'pictures need matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib  # optional: imported here so the package never needs it
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: write files, never open windows
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path):
    """Write `fig` to `path` atomically (a PNG is whole or absent) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def read_log(run_dir):
    """{"train": [(step, loss)], "val": [(step, val_loss)], "accuracy": [(step, accuracy)]} from run_dir/log.jsonl."""
    path = os.path.join(run_dir, "log.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise MiniloraError(f"{path} does not exist; pass train.py output directories (they hold log.jsonl)")
    series = {"train": [], "val": [], "accuracy": []}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill (progress.py drops them on resume too)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            for key, name in (("loss", "train"), ("val_loss", "val"), ("accuracy", "accuracy")):
                v = rec.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series[name].append((rec["step"], float(v)))
    if not series["train"] and not series["val"]:
        raise MiniloraError(f"{path} holds no loss records; is it a train.py log?")
    return series


def label(run_dir):
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def summary_table(runs):
    """One line per run: steps, last train loss, best and last validation loss, last accuracy."""
    lines = [f"{'run':<24} {'steps':>6} {'train loss':>10} {'val loss':>9} {'best val':>9} {'accuracy':>9}"]
    for name, s in runs.items():
        def last(key, fmt):
            return format(s[key][-1][1], fmt) if s[key] else "-"
        best = format(min(v for _, v in s["val"]), ".4f") if s["val"] else "-"
        steps = max((st for key in s for st, _ in s[key]), default=0)
        lines.append(f"{name:<24} {steps:>6} {last('train', '.4f'):>10} {last('val', '.4f'):>9} {best:>9} "
                     f"{last('accuracy', '.1%'):>9}")
    return "\n".join(lines)


def plot_runs(plt, runs, path):
    """Loss (train solid, validation dashed, one colour per run) and, where logged, accuracy beside it."""
    has_acc = any(s["accuracy"] for s in runs.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    for i, (name, s) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        if s["train"]:
            ax.plot(*zip(*s["train"]), color=colour, lw=1.2, label=f"{name} train")
        if s["val"]:
            ax.plot(*zip(*s["val"]), color=colour, lw=1.5, ls="--", marker="o", ms=3, label=f"{name} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_acc:
        ax = axes[0][1]
        for i, (name, s) in enumerate(runs.items()):
            if s["accuracy"]:
                ax.plot(*zip(*s["accuracy"]), color=f"C{i % 10}", marker="o", ms=3, label=name)
        ax.set(xlabel="step", ylabel="held-out exact match", title="accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(plt, fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot train/validation loss (and accuracy) of train.py runs.")
    parser.add_argument("runs", nargs="+", help="train.py output directories (each holds log.jsonl)")
    parser.add_argument("--out", default="loss.png", help="the chart's file (default: loss.png)")
    args = parser.parse_args(argv)
    runs = {}
    for d in args.runs:
        name = label(d)
        runs[name if name not in runs else d] = read_log(d)
    print(summary_table(runs))
    plt = pyplot()
    if plt is None:
        print(PLOT_HINT, file=sys.stderr)
        return None
    plot_runs(plt, runs, args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main_guard(main)
