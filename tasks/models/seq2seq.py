"""The copy task's model: shared embedding, recurrent encoder and decoder, linear read-out."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..harness import make_rnn

PAD = 0  # symbols are 1..vocab, GO is vocab + 1


class Seq2Seq(nn.Module):
    """Shared embedding, recurrent encoder and decoder, linear read-out over the vocabulary."""

    def __init__(self, cfg: Dict):
        super().__init__()
        self.vocab = cfg["vocab"]
        self.embed = nn.Embedding(self.vocab + 2, cfg["embed"], padding_idx=PAD)
        self.encoder = make_rnn(cfg, cfg["embed"])
        # --shared-rnn: one recurrent stack reads the source and writes the copy (GO marks the
        # switch), so the decoder's counting is the encoder's.
        self.decoder = self.encoder if cfg.get("shared_rnn") else make_rnn(cfg, cfg["embed"])
        # --decoder-input go: the decoder reads GO at every step instead of the previous
        # symbol, so training and greedy decoding feed it the same thing.
        self.feed_previous = cfg.get("decoder_input", "previous") == "previous"
        self.out = nn.Linear(cfg["hidden"], self.vocab + 2)

    def _run(self, rnn: nn.Module, tokens, lengths: Optional[torch.Tensor], state=None):
        x = self.embed(tokens)
        if lengths is None:
            return rnn(x, state)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, state = rnn(packed, state)
        return pad_packed_sequence(y, total_length=tokens.size(0))[0], state

    def forward(self, src, dec_in, lengths: Optional[torch.Tensor] = None,
                src_lengths: Optional[torch.Tensor] = None):
        """Teacher-forced logits [T, B, vocab + 2]; ``lengths`` given = packed sequences, and
        ``src_lengths`` (default ``lengths``) = the sources' lengths, leading pads included."""
        _, state = self._run(self.encoder, src, lengths if src_lengths is None else src_lengths)
        if not self.feed_previous:
            dec_in = torch.full_like(dec_in, self.vocab + 1)
        y, _ = self._run(self.decoder, dec_in, lengths, state)
        return self.out(y)

    def greedy(self, src, steps: int, lengths: Optional[torch.Tensor] = None):
        """Decode ``steps`` symbols feeding back the argmax; returns [steps, B]. ``lengths``:
        the sources' lengths when packed."""
        _, state = self._run(self.encoder, src, lengths)
        token = torch.full((src.size(1),), self.vocab + 1, dtype=torch.long, device=src.device)
        out = []
        for _ in range(steps):
            y, state = self.decoder(self.embed(token)[None], state)
            out.append(self.out(y[0]).argmax(-1))
            if self.feed_previous:
                token = out[-1]
        return torch.stack(out)
