"""Digit recall (seed report 002, question 2): an LSTM reads a sequence of random digits and
names, at the end, the digit it saw at a fixed position.

The report shows one randomised test, input ``[3, 5, 8, 6, 8]`` and truth ``5``, and no rule.
The task chosen here is the simplest one that example fits: recall the digit at position
``--position`` (default 2, counted from 1) of a ``--length``-digit sequence (default 5). The
model must carry that digit through the remaining steps in its state, which is why accuracy
should rise with the hidden size (the report's claim, for 2, 5 and 10 units). Other rules fit
one example too (the digit before the last digit's first occurrence, say); a fixed position is
the classic recall setting and the simplest rule that fits.

Each digit is one-hot (10 inputs); the LSTM's last output goes through a linear layer to 10
classes. Adam at lr 0.01 with betas (0.9, 0.99), cross entropy, as in the report.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .harness import Metric, Task, main, make_rnn

_REPORT = dict(cell="lstm", layers=1, optimizer="adam", lr=0.01, betas=(0.9, 0.99),
               batch_size=64, iters=3000, eval_every=250, log_every=25)

PRESETS = {
    "quick": dict(about="seconds: hidden 10, 600 steps", **{**_REPORT, "iters": 600,
                                                             "eval_every": 200}, hidden=10),
    **{f"report-h{h}": dict(about=f"report: LSTM of {h} units", hidden=h, **_REPORT)
       for h in (2, 5, 10)},
}


def make_batch(gen: torch.Generator, length: int, position: int, batch: int, device="cpu") -> Dict:
    """Random digits ``x [length, B]`` and the digit at ``position`` (1-based) of each."""
    if not 1 <= position <= length:
        raise ValueError(f"--position must be in 1..--length ({length}), got {position}")
    x = torch.randint(0, 10, (length, batch), generator=gen)
    return dict(x=x.to(device), y=x[position - 1].to(device))


class Recaller(nn.Module):
    def __init__(self, cfg: Dict):
        super().__init__()
        self.rnn = make_rnn(cfg, 10)
        self.out = nn.Linear(cfg["hidden"], 10)

    def forward(self, x):
        """x: [length, B] digits -> logits [B, 10] from the last step's output."""
        y, _ = self.rnn(F.one_hot(x, 10).float())
        return self.out(y[-1])


class RecallTask(Task):
    name = "recall"
    description = __doc__
    defaults = dict(length=5, position=2, test_size=1000, show=3)
    presets = PRESETS
    default_preset = "report-h5"
    train_metrics = (Metric("acc", "accuracy"),)
    test_metrics = (Metric("acc", "accuracy"),)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--length", type=int, default=None, help="digits per sequence (default 5)")
        p.add_argument("--position", type=int, default=None,
                       help="the position to recall, from 1 (default 2)")
        p.add_argument("--test-size", type=int, default=None)
        p.add_argument("--show", type=int, default=None,
                       help="randomised tests printed at each evaluation (default 3)")

    def build(self, cfg: Dict) -> nn.Module:
        return Recaller(cfg)

    def sample(self, cfg, gen, device):
        return make_batch(gen, cfg["length"], cfg["position"], cfg["batch_size"], device)

    def loss(self, model, batch):
        logits = model(batch["x"])
        return F.cross_entropy(logits, batch["y"]), {
            "acc": (logits.argmax(-1) == batch["y"]).float().mean().item()}

    def test_sets(self, cfg, gen, device):
        return {f"test:length {cfg['length']}": make_batch(gen, cfg["length"], cfg["position"],
                                                           cfg["test_size"], device)}

    def evaluate(self, model, cfg, batch):
        logits = model(batch["x"])
        prediction = logits.argmax(-1)
        for b in range(min(cfg["show"], len(prediction))):  # the report's randomised tests
            print(f"Input Sequence {batch['x'][:, b].tolist()}  Truth {int(batch['y'][b])}  "
                  f"Prediction {int(prediction[b])}")
        return dict(loss=F.cross_entropy(logits, batch["y"]).item(),
                    acc=(prediction == batch["y"]).float().mean().item())


TASK = RecallTask()

if __name__ == "__main__":
    main(TASK)
