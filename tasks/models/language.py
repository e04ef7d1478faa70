"""A language model: embedding, recurrent stack, linear read-out over the vocabulary, with
dropout on the non-recurrent connections and optionally tied input and output embeddings."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from ..harness import make_rnn


class LanguageModel(nn.Module):
    def __init__(self, cfg: Dict, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg["embed"])
        self.drop = nn.Dropout(cfg.get("dropout", 0.0))
        self.rnn = make_rnn(cfg, cfg["embed"], dropout=cfg.get("dropout", 0.0)
                            if cfg["layers"] > 1 else 0.0)
        self.out = nn.Linear(cfg["hidden"], vocab)
        if cfg.get("tie_weights"):
            if cfg["embed"] != cfg["hidden"]:
                raise ValueError("--tie-weights needs --embed equal to --hidden")
            self.out.weight = self.embed.weight

    def forward(self, tokens, state=None):
        """tokens: [T, B] -> (logits [T, B, vocab], state to carry to the next window)."""
        y, state = self.rnn(self.drop(self.embed(tokens)), state)
        return self.out(self.drop(y)), state
