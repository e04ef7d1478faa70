"""Sequential MNIST (seed report 002, question 1): a recurrent classifier reads each 28x28 image
row by row (28 steps of 28 pixels) and a linear layer gives the digit.

The report's setting: Adam at lr 1e-3, cross entropy, "L2 regularisation 0.01 used always"
(PyTorch code: Adam's own ``weight_decay=0.01``, an L2 term added to the gradient; here
``--weight-decay 0.01 --l2-coupling coupled``, and ``--l2-coupling decoupled`` for AdamW), an
evaluation on all 10,000 test images after every epoch. Its grid: LSTM, GRU and RNN at hidden
64, 128 and two layers of 64, each one- and bidirectional (18 presets ``report-<cell>-<size>``
with ``-bi``; ``--preset grid`` runs them all and writes one table and one figure).

``--permuted``: the standard long-sequence variant, 784 steps of one pixel in a fixed random
order. ``--train-size`` / ``--test-size`` use the first N images (quick runs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.mnist import load_split
from .harness import Metric, Task, main as harness_main, save_grid
from .models import SequenceClassifier

PERMUTATION_SEED = 92916  # the fixed pixel order of --permuted
_REPORT = dict(optimizer="adam", lr=1e-3, weight_decay=0.01, l2_coupling="coupled",
               batch_size=128, epochs=10, eval_every=0, log_every=50)
_SIZES = {"64": dict(hidden=64, layers=1), "128": dict(hidden=128, layers=1),
          "64x2": dict(hidden=64, layers=2)}
GRID = [f"report-{cell}-{size}{'-bi' if bi else ''}" for cell in ("lstm", "gru", "rnn")
        for size in _SIZES for bi in (False, True)]

PRESETS = {
    "quick": dict(about="seconds: 8192 training and 1000 test images, 3 epochs",
                  cell="lstm", hidden=48, train_size=8192, test_size=1000, epochs=3,
                  batch_size=64, lr=3e-3, eval_every=0, log_every=16),
    **{name: dict(about=f"report grid: {name[7:]}", cell=name.split("-")[1],
                  bidirectional=name.endswith("-bi"), **_SIZES[name.split("-")[2]], **_REPORT)
       for name in GRID},
    "grid": dict(about="all 18 report configurations, one table and one figure", **_REPORT),
    "permuted": dict(about="pixel by pixel in a fixed random order (784 steps), LSTM 128",
                     cell="lstm", hidden=128, permuted=True, optimizer="adam", lr=1e-3,
                     batch_size=128, epochs=10, eval_every=0, log_every=20, clip=1.0),
}


class SequentialMNIST(Task):
    name = "smnist"
    description = __doc__
    defaults = dict(bidirectional=False, permuted=False, train_size=None, test_size=None,
                    eval_batch=1000)
    presets = PRESETS
    default_preset = "report-lstm-128"
    grid = GRID
    dataset = True
    train_metrics = (Metric("acc", "accuracy"),)
    test_metrics = (Metric("acc", "accuracy"),)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--bidirectional", action="store_true", default=None)
        p.add_argument("--no-bidirectional", dest="bidirectional", action="store_false")
        p.add_argument("--permuted", action="store_true", default=None,
                       help="784 steps of one pixel in a fixed random order")
        p.add_argument("--train-size", type=int, default=None, help="use the first N training images")
        p.add_argument("--test-size", type=int, default=None, help="use the first N test images")

    def _split(self, cfg: Dict, split: str):
        images, labels = load_split(cfg["data_dir"], split)
        limit = cfg["train_size"] if split == "train" else cfg["test_size"]
        return (images[:limit], labels[:limit]) if limit else (images, labels)

    def prepare(self, cfg: Dict) -> None:
        self._split(cfg, "train")  # a missing or corrupt file says so before the model is built

    def _inputs(self, cfg: Dict, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 28, 28] -> [B, steps, features] in the run's dtype: rows, or permuted
        pixels."""
        x = images.to(getattr(torch, cfg.get("dtype", "float32"))) / 255.0
        if cfg["permuted"]:
            order = torch.randperm(784, generator=torch.Generator().manual_seed(PERMUTATION_SEED))
            return x.flatten(1)[:, order, None]
        return x

    def build(self, cfg: Dict) -> nn.Module:
        return SequenceClassifier(cfg, 1 if cfg["permuted"] else 28, 10)

    def train_size(self, cfg: Dict) -> int:
        return len(self._split(cfg, "train")[1])

    def train_batch(self, cfg: Dict, index: torch.Tensor, device) -> Dict:
        images, labels = self._split(cfg, "train")
        return dict(x=self._inputs(cfg, images[index]).to(device), y=labels[index].to(device))

    def loss(self, model, batch):
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        return loss, {"acc": (logits.argmax(-1) == batch["y"]).float().mean().item()}

    def test_sets(self, cfg: Dict, gen, device) -> Dict:
        images, labels = self._split(cfg, "test")
        return {f"test ({len(labels)} images)": (images, labels)}

    def evaluate(self, model, cfg: Dict, data) -> Dict[str, float]:
        images, labels = data
        loss = hits = 0.0
        for begin in range(0, len(labels), cfg["eval_batch"]):
            x = self._inputs(cfg, images[begin:begin + cfg["eval_batch"]])
            y = labels[begin:begin + cfg["eval_batch"]]
            logits = model(x.to(cfg["device"])).cpu()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            hits += (logits.argmax(-1) == y).sum().item()
        return dict(loss=loss / len(labels), acc=hits / len(labels))

    def write_grid(self, out: Path, results: Dict[str, Dict]) -> None:
        """grid.md: the final test accuracy and loss and the wall time of every configuration;
        grid.png: train loss, test loss and test accuracy against epoch, a panel each."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lines = ["| configuration | epochs | test accuracy | test loss | best accuracy (epoch) | "
                 "wall s | backend | status |", "|---|---|---|---|---|---|---|---|"]
        fig, axes = plt.subplots(3, 6, figsize=(24, 10), squeeze=False)
        for ax, (preset, r) in zip(axes.flat, results.items()):
            records = [json.loads(line) for line in open(r["metrics_log"])]
            train_r = [x for x in records if x["kind"] == "train"]
            test_r = [x for x in records if x["kind"] == "test"]
            (name, final), = r["test"].items()
            best = max(test_r, key=lambda x: x["acc"])
            epochs = r["steps"] * r["config"]["batch_size"] / (r["config"]["train_size"] or 60000)
            lines.append(f"| {preset[7:]} | {epochs:.0f} | {100 * final['acc']:.2f}% | "
                         f"{final['loss']:.4f} | {100 * best['acc']:.2f}% ({best['epoch']:.0f}) | "
                         f"{r['wall_time_s']:.0f} | {','.join(r['backends'])} | {r['status']} |")
            ax.plot([x["epoch"] for x in train_r], [x["loss"] for x in train_r], label="train loss",
                    alpha=0.6)
            ax.plot([x["epoch"] for x in test_r], [x["loss"] for x in test_r], marker=".",
                    label="test loss")
            ax.set_yscale("log")
            ax.set(title=preset[7:], xlabel="epoch")
            acc = ax.twinx()
            acc.plot([x["epoch"] for x in test_r], [100 * x["acc"] for x in test_r], color="C2",
                     marker=".", label="test accuracy")
            acc.set_ylim(80, 100)
            ax.grid(alpha=0.3)
            if preset == GRID[0]:
                ax.legend(fontsize=7, loc="upper center")
                acc.legend(fontsize=7, loc="lower center")
        fig.suptitle("sequential MNIST, report 002's grid: loss (log, left) and test accuracy "
                     "(%, right) against epoch", fontsize=11)
        save_grid(out, fig, lines, dpi=80)

TASK = SequentialMNIST()


if __name__ == "__main__":
    harness_main(TASK)
