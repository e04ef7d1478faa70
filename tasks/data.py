"""Where the shared data sets live (MNIST, PTB, Tiny Shakespeare). Loaders go beside this."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_data_dir(explicit: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The data directory: ``explicit``, else ``$FUSEDRNN_DATA``, else ``<repo>/../shared/data``.

    Returns None when the chosen directory does not exist, so callers can skip or explain.
    """
    for candidate in (explicit, os.environ.get("FUSEDRNN_DATA"), REPO_ROOT.parent / "shared" / "data"):
        if candidate:
            path = Path(candidate).expanduser()
            return path if path.is_dir() else None
    return None
