"""The per-layer, per-direction sequence interface every backend implements.

Input rows are time-major with per-step active-row counts (PackedSequence's
``batch_sizes``): step t owns ``batch_sizes[t]`` rows, the counts never increase, and a
padded batch is the case where every count is B. At step t only rows ``[0, batch_sizes[t])``
are computed; the other rows of the state buffer keep their last (or, in reverse, their
initial) state, which is exactly the final state torch.nn returns for packed input.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells import Cell


def step_rows(batch_sizes: Tensor):
    """``(sizes, offsets)``: each step's active-row count and its first row in the packed rows."""
    sizes = [int(n) for n in batch_sizes.tolist()]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    return sizes, offsets


class Backend:
    """One way to run a layer. Subclasses implement ``sequence``; the availability checks and
    ``layer`` have defaults they override where needed."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when usable on this machine, else why not (missing extension, no GPU, ...)."""
        return None

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype, cell: Cell,
                           hidden_size: int, proj_size: int) -> Optional[str]:
        """None when this backend handles the given layer, else why not."""
        return None

    def sequence(self, cell: Cell, xp: Tensor, batch_sizes: Tensor, h0: Tensor,
                 c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                 w_hr: Optional[Tensor], reverse: bool):
        """Run one layer and direction; differentiable in every tensor argument.

        xp:          [rows, G*H]  the hoisted input projection ``x @ W_ih^T + b_ih``
        batch_sizes: [T] int64 on the CPU, non-increasing, ``sum == rows``
        h0:          [B, Hout]    Hout = proj_size or H; B == batch_sizes[0]
        c0:          [B, H] for LSTM, else None
        w_hh:        [G*H, Hout];  b_hh: [G*H] or None;  w_hr: [Hout, H] or None (LSTM proj)
        returns y [rows, Hout], h_n [B, Hout], c_n [B, H] or None
        """
        raise NotImplementedError

    def layer(self, cell: Cell, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor],
              w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              w_hr: Optional[Tensor], reverse: bool):
        """The whole layer direction from its input rows ``x [rows, I]``.

        By default the hoisted input projection (one GEMM over every row) followed by
        ``sequence``; a kernel backend may override it to fuse the projection's bias and
        gradients into its own kernels.
        """
        return self.sequence(cell, F.linear(x, w_ih, b_ih), batch_sizes, h0, c0, w_hh, b_hh,
                             w_hr, reverse)
