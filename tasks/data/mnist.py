"""MNIST from its four IDX files (LeCun's format: a big-endian header, then bytes), gzip or not.

``load_split(data_dir, "train")`` returns ``(images uint8 [N, 28, 28], labels int64 [N])``.
A file whose header or size does not fit the format is a DataError naming it.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from . import DataError, data_file, find_data_dir

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_cache: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = {}


def read_idx(path: Path) -> np.ndarray:
    """The array an IDX file holds (unsigned bytes only, as MNIST's are)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a truncated or non-gzip file
        raise DataError(f"{path} cannot be read as {'gzip' if opener is gzip.open else 'IDX'}: "
                        f"{exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (its first bytes are "
                        f"{raw[:4].hex()}, expected 000008 and the rank)")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: the IDX header is cut short")
    shape = struct.unpack(f">{rank}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: the header says {shape} ({expected} bytes) but "
                        f"{len(raw) - header} bytes follow it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _file(data_dir, name: str) -> Path:
    """The gzip file if present, else the uncompressed one, else a DataError for the gzip."""
    root = find_data_dir(data_dir)
    if root is not None and not (root / "mnist" / f"{name}.gz").exists() \
            and (root / "mnist" / name).exists():
        return root / "mnist" / name
    return data_file(data_dir, f"mnist/{name}.gz")


def load_split(data_dir, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the "train" or "test" split."""
    key = (str(data_dir), split)
    if key not in _cache:
        images_name, labels_name = FILES[split]
        images = read_idx(_file(data_dir, images_name))
        labels = read_idx(_file(data_dir, labels_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {split}: {images.shape} images and {labels.shape} labels "
                            "do not pair up")
        _cache[key] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return _cache[key]
