"""The cell registry: what each recurrent cell computes and what its kernels need to know.

A cell step takes the two pre-activations of one time step,
``xg = x @ W_ih^T + b_ih`` and ``hg = h @ W_hh^T + b_hh`` (both ``[rows, G*H]``),
and the previous states, and returns ``(h_new, c_new)``. ``b_hh`` stays inside ``hg``
because the GRU's reset gate multiplies it (PyTorch's reset-after convention).
The reference backend runs these functions; every kernel is tested against them.
LSTM ``proj_size`` is not part of the step: the sequence loop applies ``W_hr`` after it.

Kernels and backends branch on a cell's traits (``Cell``'s fields), never on its name. The
math exists once per language: ``step`` here (torch), ``triton_math`` (kernels/cells.py) and
``csrc/cells/*.h`` (C++ and CUDA, listed in csrc/cells/cells.h). A new cell is a ``Cell`` with
its math, registered with ``register``; the backends that lack its math say so and ``auto``
falls back to the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], "tuple[Tensor, Optional[Tensor]]"]


# eq=False: a cell is its registry entry, compared and hashed by identity (dispatch keys on it)
@dataclass(frozen=True, eq=False)
class Cell:
    name: str                # the registry key ("lstm", "gru", "rnn_tanh", "rnn_relu")
    gates: int               # G: W_ih and W_hh have G*H rows
    states: int              # 1 (h) or 2 (h and a cell state c)
    reads_h: bool            # the pointwise math reads h_prev itself (not only through hg)
    split_hidden_grad: bool  # d(hg) differs from d(xg) (the GRU's reset gate scales hg_n)
    saved_per_h: int         # values per row and hidden unit the C++/CUDA forward saves
    step: StepFn             # the math in torch (the reference backend)
    # () -> (forward, backward) @triton.jit functions; a function, so that Triton is only
    # imported by the backend that runs them
    triton_math: Optional[Callable[[], Tuple[Callable, Callable]]] = None
    extra_params: Tuple[str, ...] = ()  # names of per-cell parameters beyond the torch.nn ones

    @property
    def has_cell_state(self) -> bool:
        return self.states == 2

    def __repr__(self) -> str:
        return f"Cell({self.name})"


def built_cell_reason(cell: Cell, built: Optional[Tuple[int, ...]], kernels: str) -> Optional[str]:
    """Why compiled kernels cannot run ``cell``: ``built`` is the cell's traits as they were
    compiled (csrc/cells/cells.h: gates, states, reads h, split hidden grad, saved per unit), or
    None when they have no such cell; None when the traits agree with the registry's."""
    mine = (cell.gates, cell.states, int(cell.reads_h), int(cell.split_hidden_grad),
            cell.saved_per_h)
    if built is None:
        return f"the {kernels} kernels have no cell {cell.name!r} (csrc/cells/cells.h)"
    if tuple(built) != mine:
        return (f"the {kernels} cell {cell.name!r} has traits {tuple(built)}, the registry's "
                f"{mine} (gates, states, reads h, split hg, saved)")
    return None


def lstm_step(xg: Tensor, hg: Tensor, h: Tensor, c: Optional[Tensor]):
    i, f, g, o = (xg + hg).chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def gru_step(xg: Tensor, hg: Tensor, h: Tensor, c: Optional[Tensor]):
    xr, xz, xn = xg.chunk(3, dim=-1)
    hr, hz, hn = hg.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return n + z * (h - n), None


def rnn_tanh_step(xg: Tensor, hg: Tensor, h: Tensor, c: Optional[Tensor]):
    return torch.tanh(xg + hg), None


def rnn_relu_step(xg: Tensor, hg: Tensor, h: Tensor, c: Optional[Tensor]):
    return torch.relu(xg + hg), None


def _lstm_triton():
    from .kernels.cells import lstm_bwd, lstm_fwd
    return lstm_fwd, lstm_bwd


def _gru_triton():
    from .kernels.cells import gru_bwd, gru_fwd
    return gru_fwd, gru_bwd


def _rnn_tanh_triton():
    from .kernels.cells import rnn_tanh_bwd, rnn_tanh_fwd
    return rnn_tanh_fwd, rnn_tanh_bwd


def _rnn_relu_triton():
    from .kernels.cells import rnn_relu_bwd, rnn_relu_fwd
    return rnn_relu_fwd, rnn_relu_bwd


CELLS: Dict[str, Cell] = {}


def register(cell: Cell) -> Cell:
    """Adds a cell to the registry (the backends find it by its traits and math)."""
    if cell.name in CELLS:
        raise ValueError(f"a cell named {cell.name!r} is already registered")
    if cell.states not in (1, 2):
        raise ValueError(f"a cell has 1 or 2 states, not {cell.states}")
    CELLS[cell.name] = cell
    return cell


register(Cell("lstm", gates=4, states=2, reads_h=False, split_hidden_grad=False, saved_per_h=5,
              step=lstm_step, triton_math=_lstm_triton))
register(Cell("gru", gates=3, states=1, reads_h=True, split_hidden_grad=True, saved_per_h=4,
              step=gru_step, triton_math=_gru_triton))
register(Cell("rnn_tanh", gates=1, states=1, reads_h=False, split_hidden_grad=False,
              saved_per_h=1, step=rnn_tanh_step, triton_math=_rnn_tanh_triton))
register(Cell("rnn_relu", gates=1, states=1, reads_h=False, split_hidden_grad=False,
              saved_per_h=1, step=rnn_relu_step, triton_math=_rnn_relu_triton))

# torch.nn's RNNBase.mode strings
_MODE_TO_CELL = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def cell_for_mode(mode: str) -> Cell:
    """The cell for a torch.nn ``RNNBase.mode`` string."""
    return CELLS[_MODE_TO_CELL[mode]]
