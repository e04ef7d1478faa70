"""A sequence classifier: a recurrent stack reads the whole sequence; its last layer's final
states (both directions' when bidirectional) go through one linear layer."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from ..harness import make_rnn


class SequenceClassifier(nn.Module):
    def __init__(self, cfg: Dict, input_size: int, classes: int):
        super().__init__()
        self.bidirectional = bool(cfg.get("bidirectional"))
        self.rnn = make_rnn(cfg, input_size, batch_first=True, bidirectional=self.bidirectional)
        self.out = nn.Linear(cfg["hidden"] * (2 if self.bidirectional else 1), classes)

    def forward(self, x):
        """x: [B, T, features] -> logits [B, classes]. A final state is the last step's
        output of its direction (the reverse direction's after reading the whole sequence)."""
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state  # [layers * dirs, B, H]
        directions = 2 if self.bidirectional else 1
        return self.out(torch.cat(list(h_n[-directions:]), dim=-1))
