"""The copy task (seed report 000): a seq2seq encoder-decoder that copies random symbols.

The encoder reads the source; its final state starts the decoder, which is fed ``GO, y1 ..
y_{L-1}`` in training (teacher forcing) and predicts ``y1 .. yL``. Test accuracy is per symbol
with greedy decoding (the decoder is fed its own predictions); test loss is teacher forced.

Lengths: training sequences have ``--length`` symbols (or a uniform random length in
``[--min-length, --length]``). With ``--pad-to P`` sources are padded with PAD up to P and the
encoder reads the pads (the report's "train 20 + 10 padding"); with ``--packed`` the encoder and
decoder get PackedSequences, so padding is never read at all. The loss is masked to real symbols.
``--lead-pad N`` (packed only) puts a random 0..N PADs before each training source, so the
encoder reads symbols at later time steps than the training lengths alone reach.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .harness import Metric, Task, main
from .models import PAD, Seq2Seq  # noqa: F401 (PAD: symbols are 1..vocab, GO is vocab + 1)

# The seed report's model: embedding 100, hidden 500, batch 128, RMSProp(6e-4, momentum 0.9).
_REPORT = dict(embed=100, hidden=500, batch_size=128, optimizer="rmsprop", lr=6e-4,
               eval_every=500)

PRESETS = {
    "quick": dict(about="under a minute: loss falls, accuracy climbs", length=8, embed=32,
                  hidden=128, batch_size=64, lr=3e-3, iters=300, eval_every=100,
                  test_lengths="8", reverse_source=True),
    "default": dict(about="the main job: >= 99% at length 20 in about 10 minutes", length=20,
                    embed=64, hidden=256, batch_size=64, lr=2e-3, lr_schedule="cosine",
                    min_lr=1e-4, iters=3000, eval_every=250,
                    test_lengths="20", reverse_source=True, clip=5.0),
    "report-train20": dict(about="report model 1: train 20, test 10/20/30", length=20,
                           test_lengths="10,20,30", iters=15000, **_REPORT),
    "report-train20-pad30": dict(about="report model 2: train 20 padded to 30", length=20,
                                 pad_to=30, test_lengths="10,20,30", iters=15000, **_REPORT),
    "report-train30": dict(about="report model 3: train 30, test 20/30/50", length=30,
                           test_lengths="20,30,50", iters=12000, **_REPORT),
    "report-train30-pad50": dict(about="report model 4: train 30 padded to 50", length=30,
                                 pad_to=50, test_lengths="20,30,50", iters=100000, **_REPORT),
    "generalise": dict(about="length study: random lengths 1..30, packed, test up to 50",
                       length=30, min_length=1, packed=True, test_lengths="10,20,30,50",
                       embed=64, hidden=256, batch_size=64, lr=2e-3, lr_schedule="cosine",
                       min_lr=1e-4, iters=4000, eval_every=500,
                       reverse_source=True, clip=5.0),
}


def make_batch(gen: torch.Generator, lengths: torch.Tensor, vocab: int, pad_to: int = 0,
               reverse_source: bool = False, device="cpu", *,
               lead_pads: Optional[torch.Tensor] = None) -> Dict:
    """Random sequences of the given lengths, time-major and padded with PAD.

    target = the sequence itself; dec_in = GO then the sequence shifted by one; src = the
    sequence (reversed within its length with ``reverse_source``), after ``lead_pads[b]`` PADs
    if given; src_lengths = the sources' lengths with those PADs; mask = real positions.
    """
    steps = max(int(lengths.max()), pad_to)
    pos = torch.arange(steps)[:, None]
    mask = pos < lengths[None, :]
    seq = torch.randint(1, vocab + 1, (steps, len(lengths)), generator=gen) * mask
    src = seq
    if reverse_source:
        src = seq.gather(0, torch.where(mask, lengths[None, :] - 1 - pos, pos))
    src_lengths = lengths
    if lead_pads is not None:
        src_lengths = lengths + lead_pads
        src_pos = torch.arange(max(int(src_lengths.max()), pad_to))[:, None] - lead_pads[None, :]
        real = (src_pos >= 0) & (src_pos < lengths[None, :])
        src = torch.where(real, src.gather(0, src_pos.clamp(0, steps - 1)), PAD)
    dec_in = torch.cat([torch.full_like(seq[:1], vocab + 1), seq[:-1]])
    to = lambda t: t.to(device)  # noqa: E731
    return dict(src=to(src), dec_in=to(dec_in), target=to(seq), mask=to(mask), lengths=lengths,
                src_lengths=src_lengths)


def masked_loss(logits, target, mask):
    """Mean cross entropy over real symbols only: padded positions carry no weight at all."""
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    mask = mask.flatten().to(ce.dtype)
    return (ce * mask).sum() / mask.sum()


class CopyTask(Task):
    name = "copy"
    description = __doc__
    defaults = dict(vocab=10, embed=100, length=20, min_length=None, pad_to=0, packed=False,
                    reverse_source=False, lead_pad=0, shared_rnn=False, decoder_input="previous",
                    test_lengths="10,20,30", test_lead_pad=0, test_size=256)
    presets = PRESETS
    default_preset = "default"
    epoch_iters = 500
    train_metrics = (Metric("acc", "accuracy"),)  # teacher forced
    test_metrics = (Metric("acc", "accuracy"), Metric("seq_acc", "accuracy"),
                    Metric("acc_past_train", "accuracy"))  # greedy decoding

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--vocab", type=int, default=None, help="number of symbols (default 10)")
        p.add_argument("--embed", type=int, default=None, help="embedding size")
        p.add_argument("--length", type=int, default=None, help="(max) training length")
        p.add_argument("--min-length", type=int, default=None,
                       help="random training lengths in [min-length, length]")
        p.add_argument("--pad-to", type=int, default=None, help="pad sources with PAD to this")
        p.add_argument("--packed", action="store_true", default=None,
                       help="feed PackedSequences: padding never reaches the RNN")
        p.add_argument("--no-packed", dest="packed", action="store_false")
        p.add_argument("--lead-pad", type=int, default=None, metavar="N",
                       help="with --packed: a random 0..N PADs before each training source")
        p.add_argument("--reverse-source", action="store_true", default=None,
                       help="encoder reads the source backwards (Sutskever et al.)")
        p.add_argument("--no-reverse-source", dest="reverse_source", action="store_false")
        p.add_argument("--shared-rnn", action="store_true", default=None,
                       help="the encoder and decoder are one recurrent stack (shared weights)")
        p.add_argument("--decoder-input", choices=("previous", "go"), default=None,
                       help="what the decoder reads: the previous symbol (default; teacher "
                       "forced in training) or GO at every step")
        p.add_argument("--test-lengths", default=None, help="comma-separated, e.g. 10,20,30,50")
        p.add_argument("--test-lead-pad", type=int, default=None, metavar="P",
                       help="with --packed: test sources come after P PADs (probes whether the "
                       "model keys its memory to the time step or to the symbols read)")
        p.add_argument("--test-size", type=int, default=None, help="test sequences per length")

    def build(self, cfg: Dict) -> nn.Module:
        return Seq2Seq(cfg)

    def _train_name(self, cfg: Dict) -> int:
        return max(cfg["pad_to"], cfg["length"]) if not cfg["packed"] else cfg["length"]

    def sample(self, cfg, gen, device):
        lo = cfg["min_length"] or cfg["length"]
        lengths = torch.randint(lo, cfg["length"] + 1, (cfg["batch_size"],), generator=gen)
        pad_to = 0 if cfg["packed"] else cfg["pad_to"]
        lead_pads = None
        if cfg["lead_pad"]:
            if not cfg["packed"]:
                raise ValueError("--lead-pad needs --packed: unpacked sources would also read "
                                 "trailing pads")
            lead_pads = torch.randint(0, cfg["lead_pad"] + 1, lengths.shape, generator=gen)
        batch = make_batch(gen, lengths, cfg["vocab"], pad_to, cfg["reverse_source"], device,
                           lead_pads=lead_pads)
        batch["packed"] = cfg["packed"]
        return batch

    @staticmethod
    def _lengths(batch):
        """(target lengths, source lengths) for packed batches, else (None, None)."""
        return (batch["lengths"], batch["src_lengths"]) if batch["packed"] else (None, None)

    def teacher_forced_logits(self, model, batch):
        return model(batch["src"], batch["dec_in"], *self._lengths(batch))

    def loss(self, model, batch):
        logits = self.teacher_forced_logits(model, batch)
        loss = masked_loss(logits, batch["target"], batch["mask"])
        with torch.no_grad():
            hits = (logits.argmax(-1) == batch["target"]) & batch["mask"]
            acc = (hits.sum() / batch["mask"].sum()).item()
        return loss, {"acc": acc}

    def test_sets(self, cfg, gen, device):
        sets = {}
        # Unpacked models read fixed-width sources, as the report's placeholders did: shorter
        # test sequences are padded to the training width.
        pad_to = 0 if cfg["packed"] else self._train_name(cfg)
        if cfg["test_lead_pad"] and not cfg["packed"]:
            raise ValueError("--test-lead-pad needs --packed")
        for length in (int(x) for x in str(cfg["test_lengths"]).split(",")):
            lengths = torch.full((cfg["test_size"],), length, dtype=torch.long)
            lead_pads = (torch.full_like(lengths, cfg["test_lead_pad"])
                         if cfg["test_lead_pad"] else None)
            batch = make_batch(gen, lengths, cfg["vocab"], pad_to, cfg["reverse_source"], device,
                               lead_pads=lead_pads)
            batch["packed"] = cfg["packed"]
            sets[f"test:{length}/{self._train_name(cfg)}"] = batch
        return sets

    def greedy_hits(self, model, batch):
        """[length, B] booleans: greedy decoding got output position t of sequence b right."""
        length = int(batch["lengths"].max())
        hits = model.greedy(batch["src"], length, self._lengths(batch)[1])
        return hits == batch["target"][:length]

    def evaluate(self, model, cfg, batch):
        loss = masked_loss(self.teacher_forced_logits(model, batch), batch["target"],
                           batch["mask"]).item()
        length = int(batch["lengths"].max())
        hits = self.greedy_hits(model, batch)
        metrics = dict(loss=loss, acc=hits.float().mean().item(),
                       seq_acc=hits.all(0).float().mean().item())
        if length > cfg["length"]:  # positions no training sequence reached
            metrics["acc_past_train"] = hits[cfg["length"]:].float().mean().item()
        return metrics


TASK = CopyTask()

if __name__ == "__main__":
    main(TASK)
