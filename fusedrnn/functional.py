"""One layer, one direction: hoist the input projection, then run the chosen backend."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import dispatch
from .cells import Cell


def rnn_layer(cell: Cell, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor],
              w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              w_hr: Optional[Tensor], reverse: bool, backend: str = "auto"):
    """x: [rows, I] time-major rows with per-step counts ``batch_sizes`` (see backend.base).

    Returns ``(y [rows, Hout], h_n [B, Hout], c_n [B, H] or None)``.
    """
    hidden_size = w_hh.shape[0] // cell.gates
    proj_size = w_hr.shape[0] if w_hr is not None else 0
    impl = dispatch.select(backend, x.device, x.dtype, cell, hidden_size, proj_size)
    # Backend.layer: one input-projection GEMM over every row of every step, then the loop.
    return impl.layer(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
