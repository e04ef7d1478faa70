"""Text for language models: Penn Treebank (Mikolov's word-level text) and plain text read as
characters, as token-id streams; the usual batching of a stream into parallel rows, and
``TextStreams``, a stream read in windows as a language model's training examples.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import DataError, data_file

PTB_SPLITS = ("train", "valid", "test")


def ptb(data_dir) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    """(vocabulary, {split: int64 token ids}): each line's words then ``<eos>``, the ids in the
    order words first appear in the train split (10,000 of them with ``<eos>``)."""
    words = {s: [] for s in PTB_SPLITS}
    for split in PTB_SPLITS:
        path = data_file(data_dir, f"ptb/ptb.{split}.txt")
        for line in path.read_text().splitlines():
            words[split] += line.split() + ["<eos>"]
    vocab = list(dict.fromkeys(words["train"]))
    index = {w: i for i, w in enumerate(vocab)}
    ids = {}
    for split in PTB_SPLITS:
        unknown = sorted(set(words[split]) - index.keys())
        if unknown:
            raise DataError(f"ptb.{split}.txt has words the train split lacks: {unknown[:5]}")
        ids[split] = torch.tensor([index[w] for w in words[split]], dtype=torch.int64)
    return vocab, ids


def characters(data_dir, relative: str = "tinyshakespeare/input.txt") -> Tuple[List[str], torch.Tensor]:
    """(sorted characters, int64 ids of the text) of a plain-text file."""
    text = data_file(data_dir, relative).read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return chars, torch.tensor([index[c] for c in text], dtype=torch.int64)


def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """The stream cut into ``streams`` parallel rows, time-major ``[T, streams]`` (the tail
    that does not fill a row is dropped), the layout truncated BPTT reads in windows."""
    steps = ids.numel() // streams
    return ids[:steps * streams].view(streams, steps).t().contiguous()


class TextStreams:
    """A token stream read as a language model's training data.

    The stream is cut into ``streams`` equal rows (``rows[t, b]``); a window is ``length``
    steps of every row and its next-token targets. Example ``i`` of ``order`` and ``chunks``
    is window ``i // streams`` of row ``i % streams``, so a step's ``streams`` consecutive
    examples are one window of every row; example ``i`` of ``random`` is a start offset into
    the whole stream.
    """

    def __init__(self, ids: torch.Tensor, streams: int, length: int):
        if ids.numel() // streams < length + 1:
            raise ValueError(f"the text ({ids.numel()} tokens) is too short for "
                             f"{streams} streams of {length}-token sequences")
        self.ids, self.streams, self.length = ids, streams, length
        self.rows = batchify(ids, streams)
        self.windows = (self.rows.shape[0] - 1) // self.length
        self.starts = ids.numel() - length  # random start offsets: 0 .. starts - 1

    def __len__(self) -> int:
        return self.windows * self.streams

    def order(self, sampler: str, chunks: int, gen: torch.Generator) -> torch.Tensor:
        """One epoch's examples, ``streams`` per step."""
        if sampler == "random":
            return torch.randint(0, self.starts, (len(self),), generator=gen)
        if sampler == "order":
            return torch.arange(len(self))
        if sampler == "chunks":
            return torch.cat([torch.arange(b * self.streams, e * self.streams)
                              for b, e in (self.chunk_bounds(chunks)[c]
                                           for c in torch.randperm(chunks, generator=gen))])
        raise ValueError(f"unknown sampler {sampler!r}")

    def chunk_bounds(self, chunks: int) -> List[tuple]:
        """[first window, end window) of each chunk."""
        if not 1 <= chunks <= self.windows:
            raise ValueError(f"--chunks must be in 1..{self.windows}, got {chunks}")
        edges = [c * self.windows // chunks for c in range(chunks + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def batch(self, index: torch.Tensor, sampler: str, chunks: int) -> Dict:
        """Inputs and targets ``[length, len(index)]``, and whether the state starts at zero."""
        t = torch.arange(self.length + 1)[:, None]
        if sampler == "random":
            seq = self.ids[index[None, :] + t]
            reset = True
        else:
            window, row = index // self.streams, index % self.streams
            seq = self.rows[window[None, :] * self.length + t, row[None, :]]
            starts = {b for b, _ in self.chunk_bounds(chunks)} if sampler == "chunks" else {0}
            reset = int(window[0]) in starts
        return dict(x=seq[:-1], y=seq[1:], reset=reset)
