"""A language model: embedding, recurrent stack, linear read-out over the vocabulary, with
dropout on the non-recurrent connections and optionally tied input and output embeddings.

Two regularisers of AWD-LSTM (Merity et al. 2017) are options: variational ("locked") dropout,
one mask per sequence shared by every time step, on each layer's input and on the last
layer's output; and DropConnect on the recurrent weights, a dropout mask on ``W_hh`` drawn once
per forward. The mask goes on the weight, so the recurrent layers (torch.nn or fused) run
unchanged on the masked weights through ``torch.func.functional_call``.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..harness import make_rnn


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence and feature, the same at every time step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        """x: [T, B, F]."""
        if not self.training or not self.p:
            return x
        mask = x.new_empty(1, *x.shape[1:]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class LanguageModel(nn.Module):
    def __init__(self, cfg: Dict, vocab: int):
        super().__init__()
        p = cfg.get("dropout", 0.0)
        self.weight_drop = cfg.get("weight_drop", 0.0)
        self.embed = nn.Embedding(vocab, cfg["embed"])
        if cfg.get("locked_dropout"):
            # one layer per module, so the mask between layers can be a locked one
            self.drop = LockedDropout(p)
            self.rnns = nn.ModuleList(
                make_rnn({**cfg, "layers": 1}, cfg["embed"] if i == 0 else cfg["hidden"])
                for i in range(cfg["layers"]))
        else:
            self.drop = nn.Dropout(p)
            self.rnns = nn.ModuleList([make_rnn(cfg, cfg["embed"],
                                                dropout=p if cfg["layers"] > 1 else 0.0)])
        self.out = nn.Linear(cfg["hidden"], vocab)
        if cfg.get("tie_weights"):
            if cfg["embed"] != cfg["hidden"]:
                raise ValueError("--tie-weights needs --embed equal to --hidden")
            self.out.weight = self.embed.weight

    def _recurrent(self, rnn: nn.Module, x, state):
        if not (self.weight_drop and self.training):
            return rnn(x, state)
        weights = {name: F.dropout(w, self.weight_drop) if name.startswith("weight_hh") else w
                   for name, w in rnn.named_parameters()}
        return functional_call(rnn, weights, (x, state))

    def forward(self, tokens, state=None):
        """tokens: [T, B] -> (logits [T, B, vocab], the state to carry to the next window:
        a list with one entry per recurrent module)."""
        state = state or [None] * len(self.rnns)
        y, carried = self.drop(self.embed(tokens)), []
        for i, rnn in enumerate(self.rnns):
            y, s = self._recurrent(rnn, y, state[i])
            carried.append(s)
            if i + 1 < len(self.rnns):
                y = self.drop(y)
        return self.out(self.drop(y)), carried

