"""What a run leaves behind: the JSON-lines log, results.json, the curves and the summary.

Everything here follows the metrics the task declares (``Task.train_metrics``,
``Task.test_metrics``): a panel per metric, percentages for accuracies, log scale for losses
and perplexities.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .task import Metric, Task, metric_formats


class RunLog:
    """The JSON-lines metrics log plus an in-memory copy for the plot and the results file.
    ``records`` carries on a resumed run's log (those up to its checkpoint)."""

    def __init__(self, path: Optional[Path], records: Optional[List[Dict]] = None):
        self.file = open(path, "w") if path is not None else None  # None: not rank 0
        self.records: List[Dict] = []
        for record in records or []:
            self.write(**record)

    def write(self, **record) -> None:
        self.records.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def write_results(out: Path, task: Task, cfg: Dict, backends: List[str], n_params: int,
                  log: RunLog, last_eval: Dict, step: int, wall: float, eval_time: float,
                  status: str, world: int = 1, extra: Optional[Dict] = None) -> Dict:
    """results.json: the run's configuration, speed, last metrics, the best value (and step)
    of every smoothed train metric, plus ``extra`` (best weights, what the task adds)."""
    train_time = max(wall - eval_time, 1e-9)
    first = next((r["loss"] for r in log.records if r["kind"] == "first"), None)
    last_train = next((r for r in reversed(log.records) if r["kind"] == "train"), None)
    results = dict(
        task=task.name, status=status, config=cfg, backends=backends, params=n_params,
        torch=torch.__version__, threads=torch.get_num_threads(), processes=world, steps=step,
        wall_time_s=round(wall, 2), train_time_s=round(train_time, 2),
        steps_per_s=round(step / train_time, 3), first_loss=first,
        final_train=last_train, test=last_eval, best_train=_best_smoothed(task, log),
        results_file=str(out / "results.json"), metrics_log=str(out / "metrics.jsonl"))
    results.update(extra or {})
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    return results


def _best_smoothed(task: Task, log: RunLog) -> Dict[str, Dict]:
    """{metric: {value, step}}: the best logged value of each smoothed train metric."""
    best = {}
    for m in task.train_metrics:
        points = [(r[m.name], r["step"]) for r in log.records
                  if r["kind"] == "train" and m.name in r]
        if m.smoothing and points:
            value, step = (max if m.higher_is_better else min)(points, key=lambda p: p[0])
            best[m.name] = dict(value=value, step=step)
    return best


def _panels(task: Task) -> List[Metric]:
    """loss first, then every other declared metric once."""
    seen = {}
    for m in metric_formats(task).values():
        seen.setdefault(m.name, m)
    return list(seen.values())


def _x(record: Dict) -> float:
    return record["epoch"] if "epoch" in record else record["step"]


def _plot_lr(ax, runs: Dict[str, List[Dict]]) -> None:
    """The learning rate on a second axis, when a schedule changed it."""
    for label, records in runs.items():
        train = [r for r in records if r["kind"] == "train" and "lr" in r]
        if len({r["lr"] for r in train}) > 1:
            lr_ax = ax.twinx()
            lr_ax.plot([_x(r) for r in train], [r["lr"] for r in train], color="0.5", ls="--",
                       lw=1, label=f"{label} lr".strip())
            lr_ax.set_ylabel("learning rate")
            lr_ax.legend(fontsize=8, loc="center right")
            return


def plot_curves(task: Task, runs: Dict[str, List[Dict]], path: Path, title: str = "") -> Path:
    """Train and test curves of one or more runs (``runs``: label -> records) on shared axes,
    a panel per declared metric, against epochs for datasets and steps otherwise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {k for records in runs.values() for r in records for k in r}
    panels = [m for m in _panels(task) if m.name in present]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    by_epoch = any("epoch" in r for records in runs.values() for r in records)
    for ax, metric in zip(axes[0], panels):
        for label, records in runs.items():
            prefix = f"{label} " if len(runs) > 1 else ""
            scale = 100 if metric.kind == "accuracy" else 1
            train = [r for r in records if r["kind"] == "train" and metric.name in r]
            if train:
                ax.plot([_x(r) for r in train], [scale * r[metric.name] for r in train],
                        label=f"{prefix}train", alpha=0.7)
            names = dict.fromkeys(r["name"] for r in records if r["kind"] == "test")
            for name in names:
                pts = [r for r in records if r["kind"] == "test" and r["name"] == name
                       and metric.name in r]
                if pts:
                    ax.plot([_x(r) for r in pts], [scale * r[metric.name] for r in pts],
                            marker=".", label=f"{prefix}{name}")
        if metric is next((m for m in panels if m.name != "loss"), panels[0]):
            _plot_lr(ax, runs)
        if metric.kind in ("loss", "perplexity"):
            ax.set_yscale("log")
        if metric.kind == "accuracy":
            ax.set_ylim(0, 101)
        unit = " (%)" if metric.kind == "accuracy" else ""
        ax.set(xlabel="epoch" if by_epoch else "iteration", ylabel=metric.name + unit,
               title=metric.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_summary(task: Task, results: Dict) -> None:
    formats = metric_formats(task)
    cfg = results["config"]
    rows = list(results["test"].items())
    keys = list(dict.fromkeys(k for _, m in rows for k in m))
    width = max([len("test set")] + [len(n) for n, _ in rows])
    print()
    print(f"{'test set':<{width}}  " + "  ".join(f"{k:>10}" for k in keys))
    for name, m in rows:
        print(f"{name:<{width}}  " + "  ".join(
            f"{formats.get(k, Metric(k)).format(m[k]) if k in m else '':>10}" for k in keys))
    for name, best in results.get("best_train", {}).items():
        print(f"best {name}: {formats.get(name, Metric(name)).format(best['value'])} "
              f"at step {best['step']}")
    kind = "fused" if cfg["fused"] else "torch.nn"
    first = results["first_loss"]
    procs = f", processes={results['processes']}" if results.get("processes", 1) > 1 else ""
    print(f"\n{results['status']}: {results['steps']} steps in {results['wall_time_s']:.1f} s "
          f"({results['steps_per_s']:.2f} steps/s training), {kind} backend="
          f"{','.join(results['backends'])}, threads={results['threads']}{procs}"
          + (f", first loss {first:.4f}" if first is not None else ""))
    print(f"results: {results['results_file']}\nmetrics: {results['metrics_log']}")
    if "plot" in results:
        print(f"plot:    {results['plot']}")
    sys.stdout.flush()


def save_grid(out: Path, fig, lines: List[str], dpi: int = 100) -> None:
    """A grid's figure (grid.png) and markdown table (grid.md), and the table printed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=dpi)
    plt.close(fig)
    (out / "grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\ngrid table: {out / 'grid.md'}\ngrid figure: {out / 'grid.png'}")
