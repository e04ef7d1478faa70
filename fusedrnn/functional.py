"""One layer, one direction: the one call the modules make per layer and direction."""
from __future__ import annotations

from torch import Tensor

from . import dispatch
from .backend.base import LayerArgs


def rnn_layer(x: Tensor, args: LayerArgs, backend: str = "auto"):
    """x: [rows, I] time-major rows with per-step counts ``args.batch_sizes`` (backend/base.py).

    Returns ``(y [rows, Hout], h_n [B, Hout], c_n [B, H] or None)``. The backend is the one
    dispatch chose for this name and layer spec (chosen once, then cached); its ``layer``
    takes the input projection (one GEMM over every row of every step) and the time loop.
    """
    return dispatch.select(backend, args.spec(x)).layer(x, args)
