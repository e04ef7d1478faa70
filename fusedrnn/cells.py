"""The cell registry: each recurrent cell's pointwise math, defined once in torch.

A cell step takes the two pre-activations of one time step,
``xg = x @ W_ih^T + b_ih`` and ``hg = h @ W_hh^T + b_hh`` (both ``[rows, G*H]``),
and the previous states, and returns ``(h_new, c_new)``. ``b_hh`` stays inside ``hg``
because the GRU's reset gate multiplies it (PyTorch's reset-after convention).
The reference backend runs these functions; every kernel is tested against them.
LSTM ``proj_size`` is not part of the step: the sequence loop applies ``W_hr`` after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], "tuple[Tensor, Optional[Tensor]]"]


@dataclass(frozen=True)
class Cell:
    name: str             # "lstm", "gru", "rnn_tanh", "rnn_relu"
    gates: int            # G: W_ih and W_hh have G*H rows
    has_cell_state: bool  # LSTM carries c beside h
    step: StepFn

    def __repr__(self) -> str:
        return f"Cell({self.name})"


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


CELLS = {
    "lstm": Cell("lstm", 4, True, lstm_step),
    "gru": Cell("gru", 3, False, gru_step),
    "rnn_tanh": Cell("rnn_tanh", 1, False, rnn_tanh_step),
    "rnn_relu": Cell("rnn_relu", 1, False, rnn_relu_step),
}

# torch.nn's RNNBase.mode strings
_MODE_TO_CELL = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def cell_for_mode(mode: str) -> Cell:
    """The cell for a torch.nn ``RNNBase.mode`` string."""
    return CELLS[_MODE_TO_CELL[mode]]
