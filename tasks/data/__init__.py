"""The datasets the tasks read, from their standard file formats, and where they live.

- ``find_data_dir``: ``--data-dir``, else ``$FUSEDRNN_DATA``, else ``../shared/data`` beside the
  checkout (a user with their own copy points ``--data-dir`` at it);
- ``mnist``: MNIST from its four IDX files (gzip or not);
- ``text``: Penn Treebank (Mikolov's text, word level) and plain text (character level).

A missing or corrupt file is a ``DataError`` that names the file, what was expected (for the
public files, their SHA-256) and what to do; never a traceback from deep inside a parser.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

# The public files' SHA-256 (as in ../shared/data/SHA256SUMS); checked once per process.
SHA256 = {
    "mnist/train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "mnist/t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "ptb/ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb/ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb/ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "tinyshakespeare/input.txt":
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}
_verified = set()


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or not in its format; the message says which."""


def find_data_dir(explicit: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The data directory: ``explicit``, else ``$FUSEDRNN_DATA``, else ``<repo>/../shared/data``.

    Returns None when the chosen directory does not exist, so callers can skip or explain.
    """
    for candidate in (explicit, os.environ.get("FUSEDRNN_DATA"), REPO_ROOT.parent / "shared" / "data"):
        if candidate:
            path = Path(candidate).expanduser()
            return path if path.is_dir() else None
    return None


def data_file(data_dir: Optional[Union[str, Path]], relative: str) -> Path:
    """The path of a dataset file (e.g. ``mnist/train-labels-idx1-ubyte.gz``), checked against
    its public SHA-256 when it has one; a clear DataError when it is missing or differs."""
    root = find_data_dir(data_dir)
    if root is None:
        raise DataError(f"no data directory: pass --data-dir DIR (a folder holding {relative}), "
                        "set $FUSEDRNN_DATA, or put the data in ../shared/data")
    path = root / relative
    if not path.is_file():
        raise DataError(f"{path} is missing: the folder given as --data-dir must hold "
                        f"{relative}" + (f" (SHA-256 {SHA256[relative]})" if relative in SHA256
                                         else ""))
    expected = SHA256.get(relative)
    if expected is not None and path not in _verified:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(f"{path} is corrupt or another version: SHA-256 {digest}, "
                            f"expected {expected}; download it again")
        _verified.add(path)
    return path
