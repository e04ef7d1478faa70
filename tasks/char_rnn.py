"""Character-level language model (seed report 003): a vanilla RNN reads a text one character at
a time and predicts the next one; AdaGrad against Adam, sequences from random locations, the
text in chunks visited in a random order, and batch 2.

The report's base model is the DD2424 assignment 3 character RNN: one-hot characters in, 100
tanh units, a softmax over the characters; sequences of 25 characters, the hidden state carried
from one sequence to the next as the text is read in order (and reset to zero at the start of
each pass); AdaGrad with eta 0.1, each gradient element clipped to [-5, 5]; weights drawn from
N(0, 0.01^2) and biases zero (``--init course``); and the smooth loss, ``0.999 * smooth +
0.001 * loss`` after every update, where the loss is the sum over the 25 characters. Here the
model is an ``nn.RNN`` (or ``--cell lstm/gru``) and a linear read-out, so ``--fused`` converts
it.

The report's book is not available: the text is Tiny Shakespeare (``--text``, a path under
``--data-dir``), so its smooth losses are not the report's; compare orderings and ratios. The
last 5 % of the text (``--heldout``) is held out: every evaluation reports its cross entropy in
bits per character, read in order from a zero state, and prints a text sample.

How the text is read (``--sampler``):
- ``order``: the text cut into ``--batch-size`` equal streams, each read in order, 25
  characters per step, the state carried (batch 1: the whole text in order, the assignment);
- ``random``: each step's sequences start at random places, from a zero state (the report's
  "random locations"); an epoch is as many steps as ``order`` takes;
- ``chunks``: the streams cut into ``--chunks`` equal chunks, visited in a random order each
  epoch, each read in order from a zero state (the report's "compromise": 4 chunks).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.text import TextStreams, characters
from .harness import Metric, Task, main, make_rnn, save_grid

_REPORT = dict(cell="rnn", hidden=100, layers=1, seq_length=25, optimizer="adagrad", lr=0.1,
               clip_value=5.0, batch_size=1, sampler="order", chunks=4, init="course",
               iters=100000, eval_every=10000, log_every=100)

PRESETS = {
    "quick": dict(about="seconds: the adagrad model, 1500 steps",
                  **{**_REPORT, "iters": 1500, "eval_every": 500, "log_every": 50}),
    "adagrad": dict(about="report: the assignment's RNN, AdaGrad 0.1, text in order, batch 1",
                    **_REPORT),
    "adam": dict(about="report: Adam 0.001 instead of AdaGrad", **{**_REPORT,
                                                                   "optimizer": "adam",
                                                                   "lr": 1e-3}),
    "random-locations": dict(about="report: each sequence from a random place, zero state",
                             **{**_REPORT, "sampler": "random"}),
    "chunks": dict(about="report: 4 chunks in a random order each epoch",
                   **{**_REPORT, "sampler": "chunks"}),
    "batch2": dict(about="report: batch 2 (two streams), the same number of updates",
                   **{**_REPORT, "batch_size": 2}),
    "grid": dict(about="the five report presets in turn; one figure, one table (grid.png, "
                 "grid.md)", **_REPORT),
}
REPORT_PRESETS = ("adagrad", "adam", "random-locations", "chunks", "batch2")
# the report's best smooth losses (its text, its numbers of steps); AdaGrad's is not given
REPORT_SMOOTH_LOSS = {"adam": 38.7862, "random-locations": 44.2908, "chunks": 42.2365,
                      "batch2": 40.6888}


class CharModel(nn.Module):
    """One-hot characters, a recurrent stack, a linear read-out to next-character logits."""

    def __init__(self, cfg: Dict, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.rnn = make_rnn(cfg, vocab)
        self.out = nn.Linear(cfg["hidden"], vocab)
        if cfg["init"] == "course":
            with torch.no_grad():
                for name, param in self.named_parameters():
                    if "weight" in name:
                        param.normal_(0.0, 0.01)
                    else:
                        param.zero_()

    def forward(self, x, state=None):
        """x: [T, B] character ids -> (logits [T, B, vocab], state)."""
        y, state = self.rnn(F.one_hot(x, self.vocab).to(self.out.weight.dtype), state)
        return self.out(y), state


def synthesize(model: CharModel, chars: List[str], prime: str, n: int, temperature: float,
               gen: torch.Generator) -> str:
    """``n`` characters sampled one at a time after reading ``prime``; the same generator
    state gives the same text."""
    index = {c: i for i, c in enumerate(chars)}
    missing = sorted(set(prime) - index.keys())
    if not prime or missing:
        raise ValueError(f"--prime must be non-empty text of the model's characters; "
                         f"{missing} are not among them" if missing else "--prime is empty")
    if temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {temperature}")
    device = model.out.weight.device
    x = torch.tensor([index[c] for c in prime], device=device)[:, None]
    logits, state = model(x)
    out = []
    for _ in range(n):
        p = torch.softmax(logits[-1, 0].double() / temperature, -1).cpu()
        c = int(torch.multinomial(p, 1, generator=gen))
        out.append(chars[c])
        logits, state = model(torch.tensor([[c]], device=device), state)
    return "".join(out)


class CharRNNTask(Task):
    name = "char_rnn"
    description = __doc__
    defaults = dict(_REPORT, text="tinyshakespeare/input.txt", heldout=0.05, prime="\n",
                    temperature=1.0, sample_length=200, final_sample_length=1000)
    presets = PRESETS
    default_preset = "adagrad"
    dataset = True
    carries_state = True
    train_metrics = (Metric("smooth_loss", "loss", smoothing=0.999),)
    test_metrics = (Metric("bits_per_char", "loss"),)
    best_by = ("heldout", "bits_per_char")
    grid = REPORT_PRESETS

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--seq-length", type=int, default=None,
                       help="characters per sequence (truncated BPTT window, default 25)")
        p.add_argument("--sampler", choices=("order", "random", "chunks"), default=None,
                       help="how the text is read (default order; see above)")
        p.add_argument("--chunks", type=int, default=None, help="chunks for --sampler chunks "
                       "(default 4)")
        p.add_argument("--init", choices=("course", "torch"), default=None,
                       help="course: N(0, 0.01^2) weights, zero biases (the assignment's); "
                       "torch: torch.nn's own (default course)")
        p.add_argument("--text", default=None, help="the text file, relative to --data-dir "
                       "(default tinyshakespeare/input.txt)")
        p.add_argument("--heldout", type=float, default=None,
                       help="the share of the text's end held out (default 0.05)")
        p.add_argument("--prime", default=None, help="the text samples start from (default a "
                       "newline)")
        p.add_argument("--temperature", type=float, default=None,
                       help="sampling temperature (default 1)")
        p.add_argument("--sample-length", type=int, default=None,
                       help="characters sampled at each evaluation (default 200)")
        p.add_argument("--final-sample-length", type=int, default=None,
                       help="characters sampled from the best model at the end (default 1000)")

    def prepare(self, cfg: Dict) -> None:
        self.chars, ids = characters(cfg["data_dir"], cfg["text"])
        if not 0 < cfg["heldout"] < 1:
            raise ValueError(f"--heldout must be in (0, 1), got {cfg['heldout']}")
        split = int(len(ids) * (1 - cfg["heldout"]))
        self.heldout = ids[split:]
        self.train_text = TextStreams(ids[:split], cfg["batch_size"], cfg["seq_length"])

    def build(self, cfg: Dict) -> nn.Module:
        return CharModel(cfg, len(self.chars))

    def train_size(self, cfg: Dict) -> int:
        return len(self.train_text)

    def epoch_order(self, cfg, gen):
        return self.train_text.order(cfg["sampler"], cfg["chunks"], gen)

    def train_batch(self, cfg, index, device):
        batch = self.train_text.batch(index, cfg["sampler"], cfg["chunks"])
        return dict(x=batch["x"].to(device), y=batch["y"].to(device), reset=batch["reset"])

    def loss(self, model, batch, state):
        """The assignment's loss: the sum over the sequence (mean over the batch)."""
        logits, state = model(batch["x"], None if batch["reset"] else state)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum")
        loss = loss / batch["x"].shape[1]
        return loss, {"smooth_loss": loss.item()}, state

    def test_sets(self, cfg, gen, device):
        return {"heldout": self.heldout.to(device)}

    def evaluate(self, model, cfg, ids):
        """Cross entropy per character of the held-out text, read in order from zero."""
        logits, _ = model(ids[:-1, None])
        nats = F.cross_entropy(logits[:, 0].double(), ids[1:]).item()
        return dict(loss=nats, bits_per_char=nats / torch.log(torch.tensor(2.0)).item())

    def _sample(self, model, cfg, n: int, step: int) -> str:
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        return synthesize(model, self.chars, cfg["prime"], n, cfg["temperature"], gen)

    def after_evaluation(self, model, cfg, step):
        text = self._sample(model, cfg, cfg["sample_length"], step)
        print(f"--- sample at step {step} (temperature {cfg['temperature']}) ---\n{text}\n---")
        with open(Path(cfg["out"]) / "samples.txt", "a") as f:
            f.write(f"--- step {step} ---\n{text}\n")

    def finish(self, model, cfg, results):
        text = self._sample(model, cfg, cfg["final_sample_length"], 0)
        step = results.get("best", {}).get("step", "last")
        print(f"--- {len(text)} characters from the best model (step {step}) ---\n{text}\n---")
        (Path(cfg["out"]) / "sample_best.txt").write_text(text)
        return {"sample_best": text}

    def write_grid(self, out: Path, results: Dict[str, Dict]) -> None:
        """grid.md: each preset's best smooth loss (and step), held-out bits per character with
        its best weights, wall time, beside the report's smooth loss; grid.png: the smooth
        loss and the held-out bits per character against the update step, shared axes."""
        import json

        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lines = ["| preset | cell | optimizer | sampler | batch | steps | best smooth loss (step) "
                 "| held-out bits/char (step) | wall s | steps/s | backend | status | report's "
                 "smooth loss |", "|---" * 13 + "|"]
        fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(13, 4.5))
        for preset, r in results.items():
            cfg = r["config"]
            records = [json.loads(line) for line in open(r["metrics_log"])]
            train_r = [x for x in records if x["kind"] == "train"]
            test_r = [x for x in records if x["kind"] == "test"]
            ax_s.plot([x["step"] for x in train_r], [x["smooth_loss"] for x in train_r],
                      label=preset)
            ax_b.plot([x["step"] for x in test_r], [x["bits_per_char"] for x in test_r],
                      marker=".", label=preset)
            smooth = r["best_train"]["smooth_loss"]
            best = r.get("best", {})
            bpc = (f"{best['test']['heldout']['bits_per_char']:.3f} ({best['step']})" if best
                   else "-")
            report = REPORT_SMOOTH_LOSS.get(preset)
            lines.append(
                f"| {preset} | {cfg['cell']} {cfg['hidden']} | {cfg['optimizer']} {cfg['lr']:g} "
                f"| {cfg['sampler']} | {cfg['batch_size']} | {r['steps']} | "
                f"{smooth['value']:.2f} ({smooth['step']}) | {bpc} | {r['wall_time_s']:.0f} | "
                f"{r['steps_per_s']:.0f} | {','.join(r['backends'])} | {r['status']} | "
                f"{report if report is not None else 'higher than adam (no figure)'} |")
        cell = next(iter(results.values()))["config"]["cell"] if results else ""
        ax_s.set(xlabel="update step", ylabel="smooth loss (per 25-character sequence)",
                 title=f"smooth loss, {cell}, Tiny Shakespeare")
        ax_b.set(xlabel="update step", ylabel="bits per character",
                 title="held-out text (last 5 %)")
        for ax in (ax_s, ax_b):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save_grid(out, fig, lines)

    def train_log_line(self, step, record, cfg):
        return f"iter {step}, smooth loss {record['smooth_loss']:.4f}"

    def log_line(self, name, step, metrics, cfg):
        return (f"{name}, iter {step}: {metrics['bits_per_char']:.4f} bits per character "
                f"(cross entropy {metrics['loss']:.4f} nats)")


TASK = CharRNNTask()

if __name__ == "__main__":
    main(TASK)
