"""Binary addition (seed report 002, question 3): an LSTM adds two L-bit numbers bit by bit,
least significant bit first.

Step t reads the two numbers' bit t and writes the sum's bit t; a last step reads two zeros
and writes the carry, so the L+1 output bits are the whole sum. One LSTM layer (5 units; 3
and 10 too), a linear layer to one logit per step, Adam at lr 0.01 with betas (0.9, 0.99).

Two losses (``--loss``): ``mse``, the mean squared error of the sigmoid of each output against
its bit (the report's better one), and ``bce``, per-bit binary cross entropy on the logits
(the natural cross-entropy formulation; the report's was a multi-class one it calls
"hackish"). Metrics: ``bit_acc`` (bits right) and ``sum_acc`` (whole sums right).
``--test-bits 20,50`` tests on longer numbers than trained: carry-based addition should
generalise.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .harness import Metric, Task, main, make_rnn

_REPORT = dict(cell="lstm", layers=1, hidden=5, optimizer="adam", lr=0.01, betas=(0.9, 0.99),
               batch_size=64, iters=3000, eval_every=250, log_every=25)

PRESETS = {
    "quick": dict(about="seconds: 5 bits, MSE, 600 steps", bits=5, loss="mse",
                  **{**_REPORT, "iters": 600, "eval_every": 200}),
    **{f"report-{loss}-l{bits}": dict(about=f"report: {bits}-bit numbers, {loss.upper()}",
                                      bits=bits, loss=loss, **_REPORT)
       for loss in ("mse", "bce") for bits in (3, 5, 10)},
    "generalise": dict(about="train on 10-bit numbers, test on 10, 20 and 50", bits=10,
                       loss="mse", test_bits="10,20,50", **_REPORT),
}


def make_batch(gen: torch.Generator, bits: int, batch: int, device="cpu") -> Dict:
    """Random ``bits``-bit operands as bit columns ``x [bits + 1, B, 2]`` (LSB first, a last
    step of zeros) and the sum's ``bits + 1`` bits ``y [bits + 1, B]`` (float 0/1)."""
    a = torch.randint(0, 2, (bits, batch), generator=gen)
    b = torch.randint(0, 2, (bits, batch), generator=gen)
    zero = torch.zeros(1, batch, dtype=torch.long)
    a, b = torch.cat([a, zero]), torch.cat([b, zero])
    y = torch.empty_like(a)
    carry = torch.zeros(batch, dtype=torch.long)
    for i in range(bits + 1):
        s = a[i] + b[i] + carry
        y[i] = s % 2
        carry = s // 2
    x = torch.stack([a, b], dim=-1).float()
    return dict(x=x.to(device), y=y.float().to(device))


def bits_to_int(column) -> int:
    """The integer an LSB-first bit column stands for."""
    return sum(int(bit) << i for i, bit in enumerate(column.tolist()))


class Adder(nn.Module):
    def __init__(self, cfg: Dict):
        super().__init__()
        self.rnn = make_rnn(cfg, 2)
        self.out = nn.Linear(cfg["hidden"], 1)

    def forward(self, x):
        """x: [steps, B, 2] -> one logit per step and sequence, [steps, B]."""
        y, _ = self.rnn(x)
        return self.out(y).squeeze(-1)


class BinaryAddTask(Task):
    name = "binary_add"
    description = __doc__
    defaults = dict(bits=5, loss="mse", test_bits=None, test_size=1000)
    presets = PRESETS
    default_preset = "report-mse-l5"
    train_metrics = (Metric("bit_acc", "accuracy"), Metric("sum_acc", "accuracy"))
    test_metrics = (Metric("bit_acc", "accuracy"), Metric("sum_acc", "accuracy"))

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--bits", type=int, default=None, help="bits per operand (report: 3, 5, 10)")
        p.add_argument("--loss", choices=("mse", "bce"), default=None,
                       help="mse: squared error of sigmoid(output); bce: per-bit cross entropy")
        p.add_argument("--test-bits", default=None,
                       help="comma-separated operand lengths to test (default: --bits)")
        p.add_argument("--test-size", type=int, default=None)

    def build(self, cfg: Dict) -> nn.Module:
        return Adder(cfg)

    def sample(self, cfg, gen, device):
        return dict(make_batch(gen, cfg["bits"], cfg["batch_size"], device), loss=cfg["loss"])

    @staticmethod
    def _scores(kind, logits, y):
        if kind == "mse":
            loss = F.mse_loss(torch.sigmoid(logits), y)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, y)
        right = (logits > 0).float() == y
        return loss, right.float().mean().item(), right.all(0).float().mean().item()

    def loss(self, model, batch):
        loss, bit_acc, sum_acc = self._scores(batch["loss"], model(batch["x"]), batch["y"])
        return loss, {"bit_acc": bit_acc, "sum_acc": sum_acc}

    def test_sets(self, cfg, gen, device):
        lengths = str(cfg["test_bits"] or cfg["bits"]).split(",")
        return {f"test:{n} bits": make_batch(gen, int(n), cfg["test_size"], device)
                for n in lengths}

    def evaluate(self, model, cfg, batch):
        loss, bit_acc, sum_acc = self._scores(cfg["loss"], model(batch["x"]), batch["y"])
        return dict(loss=loss.item(), bit_acc=bit_acc, sum_acc=sum_acc)


TASK = BinaryAddTask()

if __name__ == "__main__":
    main(TASK)
