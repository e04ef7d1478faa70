"""Text for language models: Penn Treebank (Mikolov's word-level text) and plain text read as
characters, as token-id streams, and the usual batching of a stream into parallel rows.
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
