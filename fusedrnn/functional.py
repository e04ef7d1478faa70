"""The calls the modules make: a whole stack of layers, or one layer and direction (the cells'
modules and anyone composing layers by hand)."""
from __future__ import annotations

from torch import Tensor

from . import dispatch
from .backend.base import LayerArgs, StackArgs


def rnn_layer(x: Tensor, args: LayerArgs, backend: str = "auto"):
    """x: [rows, I] time-major rows with per-step counts ``args.batch_sizes`` (backend/base.py).

    Returns ``(y [rows, Hout], h_n [B, Hout], c_n [B, H] or None)``. The backend is the one
    dispatch chose for this name and layer spec (chosen once, then cached); its ``layer``
    takes the input projection (one GEMM over every row of every step) and the time loop.
    """
    return dispatch.select(backend, args.spec(x)).layer(x, args)


def rnn_stack(x: Tensor, stack: StackArgs, backend: str = "auto", dropout: float = 0.0):
    """Every layer and direction of a module (``stack``) from its input rows ``x``, dropout
    with probability ``dropout`` (training) after each layer but the last: ``(y, h_n [L*D, B,
    Hout], c_n or None)``. Every layer of a module has one spec (cell, hidden and projection
    sizes, dtype, device), so one backend runs them all (``Backend.stack``)."""
    return dispatch.select(backend, stack.spec(x)).stack(x, stack, dropout)
