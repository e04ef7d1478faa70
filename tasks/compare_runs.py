"""Several runs on one figure: one evaluation curve of each (read from its ``metrics.jsonl``),
against epoch, with optional reference values as dashed lines of the same colour: a report's
figures beside ours, where a table of final numbers hides how each run got there.

    python -m tasks.compare_runs runs/ptb/lstm-dropout runs/ptb/lstm --curve valid \\
        --metric perplexity --ref lstm-dropout=113.83 --ref lstm=149.03 --out ptb-valid.png

A run is labelled by its directory's name; ``--ref LABEL=VALUE`` draws VALUE in LABEL's colour.
Partial runs plot as far as they got.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional


def read_curve(run_dir: Path, curve: str, metric: str) -> List[tuple]:
    """(epoch or step, value) of every evaluation on ``curve`` in the run's log."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    points = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "test" and record.get("name") == curve and metric in record:
            points.append((record.get("epoch", record["step"]), record[metric]))
    if not points:
        raise ValueError(f"{run_dir}: no '{curve}' evaluations with '{metric}' in its log")
    return points


def plot_runs(run_dirs: List[Path], curve: str, metric: str, out: Path,
              refs: Optional[Dict[str, float]] = None, title: str = "",
              log_scale: bool = True, higher_is_better: bool = False) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    refs = dict(refs or {})
    labels = [d.name for d in run_dirs]
    unknown = sorted(set(refs) - set(labels))
    if unknown:
        raise ValueError(f"--ref for {unknown}: no run directory of that name among {labels}")
    curves = [read_curve(d, curve, metric) for d in run_dirs]
    # dataset tasks log epochs; generated-data tasks only steps
    by_epoch = all("epoch" in json.loads(line) for d in run_dirs
                   for line in (d / "metrics.jsonl").read_text().splitlines()[-1:])
    fig, ax = plt.subplots(figsize=(8, 5))
    for points, label in zip(curves, labels):
        xs, ys = zip(*points)
        best = max(ys) if higher_is_better else min(ys)
        line, = ax.plot(xs, ys, marker=".", ms=3, label=f"{label} (best {best:.4g})")
        if label in refs:
            ax.axhline(refs[label], color=line.get_color(), ls="--", lw=1,
                       label=f"{label}: reference {refs[label]:g}")
    if log_scale:  # plain numbers on the ticks, not powers of ten
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
    ax.set(xlabel="epoch" if by_epoch else "step", ylabel=f"{curve} {metric}",
           title=title or f"{curve} {metric}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _ref(text: str):
    label, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--ref wants LABEL=VALUE, got {text!r}")
    return label, float(value)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.compare_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    p.add_argument("--curve", default="valid", help="which evaluation (default valid)")
    p.add_argument("--metric", default="perplexity", help="which metric (default perplexity)")
    p.add_argument("--ref", type=_ref, action="append", default=[], metavar="LABEL=VALUE",
                   help="a reference value drawn in the colour of the run named LABEL")
    p.add_argument("--title", default="")
    p.add_argument("--linear", action="store_true", help="a linear y axis (default log)")
    p.add_argument("--higher-is-better", action="store_true",
                   help="the legend's best is the largest value (default the smallest)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    path = plot_runs(args.runs, args.curve, args.metric, args.out, dict(args.ref), args.title,
                     not args.linear, args.higher_is_better)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
