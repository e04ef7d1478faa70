"""Drop-in replacements for torch.nn's recurrent layers and cells.

They subclass the torch.nn classes, so constructor arguments, parameter names,
``state_dict`` keys and ``isinstance`` checks are torch.nn's own. ``forward`` only
translates the torch.nn input forms (padded, batch_first, unbatched, PackedSequence)
into time-major rows with per-step counts and calls ``functional.rnn_layer`` per layer
and direction.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import dispatch
from .cells import CELLS, cell_for_mode
from .functional import rnn_layer


def _check_device(module_name: str, x: Tensor, weight: Tensor, states: List[Tensor]) -> None:
    for t in (x, *states):
        if t.device != weight.device:
            raise RuntimeError(
                f"{module_name}: input and parameter tensors are not on the same device, found "
                f"a tensor on {t.device} and parameters on {weight.device}")


def _check_state_dtype(module_name: str, x: Tensor, states: List[Tensor]) -> None:
    for s in states:
        if s.dtype != x.dtype:
            raise RuntimeError(f"{module_name}: hidden state dtype ({s.dtype}) does not match "
                               f"input dtype ({x.dtype})")


class _BackendArg:
    """The one constructor argument fusedrnn adds to torch.nn's: ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = dispatch.check_name(backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class _FusedRNNMixin(_BackendArg):
    """forward() for LSTM, GRU and RNN; the torch.nn base class provides everything else."""

    def _layer_weights(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        get = lambda n: getattr(self, n + sfx) if hasattr(self, n + sfx) else None  # noqa: E731
        return (get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                get("weight_hr") if self.proj_size > 0 else None)

    def forward(self, input, hx=None):
        name = type(self).__name__
        is_lstm = self.mode == "LSTM"
        cell = cell_for_mode(self.mode)
        num_directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size

        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched = True
            if not x.is_contiguous():
                raise ValueError(f"{name}: PackedSequence data must be contiguous")
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{name}: expected a Tensor or PackedSequence input, "
                                f"got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if is_batched else input.unsqueeze(batch_dim)
            batch_sizes = sorted_indices = unsorted_indices = None
        batch = int(batch_sizes[0]) if packed else x.size(0 if self.batch_first else 1)

        if hx is None:
            shape = (self.num_layers * num_directions, batch)
            h0 = torch.zeros(*shape, out_size, dtype=x.dtype, device=x.device)
            hx = (h0, torch.zeros(*shape, self.hidden_size, dtype=x.dtype, device=x.device)) \
                if is_lstm else h0
            self.check_forward_args(x, hx, batch_sizes)
        else:
            states = list(hx) if is_lstm else [hx]
            if is_lstm and len(states) != 2:
                raise RuntimeError(f"{name}: hx must be a tuple (h_0, c_0)")
            for s in states:
                if not isinstance(s, Tensor):
                    raise TypeError(f"{name}: hidden states must be Tensors, got {type(s).__name__}")
            want = 3 if is_batched else 2
            if any(s.dim() != want for s in states):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                   f"{tuple(s.dim() for s in states)}-D tensors")
            if not is_batched:
                states = [s.unsqueeze(1) for s in states]
            hx = tuple(states) if is_lstm else states[0]
            self.check_forward_args(x, hx, batch_sizes)  # before permuting: a clear shape error
            # Each batch of the hidden state should match the input sequence the user passed.
            hx = self.permute_hidden(hx, sorted_indices)
        states = list(hx) if is_lstm else [hx]
        _check_device(name, x, self.weight_ih_l0, states)
        _check_state_dtype(name, x, states)

        if packed:
            rows = x
        else:
            if x.size(1 if self.batch_first else 0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            x = x.transpose(0, 1) if self.batch_first else x  # [T, B, I]
            steps = x.size(0)
            rows = x.reshape(steps * batch, x.size(2))
            batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
        if batch_sizes.device.type != "cpu":
            raise ValueError(f"{name}: batch_sizes must be a CPU tensor")

        h_all = states[0]
        c_all = states[1] if is_lstm else None
        h_n, c_n = [], []
        layer_input = rows
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                y, h, c = rnn_layer(cell, layer_input, batch_sizes, h_all[k],
                                    c_all[k] if is_lstm else None,
                                    *self._layer_weights(layer, direction),
                                    reverse=direction == 1, backend=self.backend)
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)

        hidden = torch.stack(h_n)
        if is_lstm:
            hidden = (hidden, torch.stack(c_n))
        if packed:
            output = PackedSequence(layer_input, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        output = layer_input.view(steps, batch, layer_input.size(-1))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(s.squeeze(1) for s in hidden) if is_lstm else hidden.squeeze(1)
        return output, hidden


class LSTM(_FusedRNNMixin, nn.LSTM):
    """``torch.nn.LSTM`` on fused kernels; extra keyword ``backend`` (see ``fusedrnn.backends()``)."""


class GRU(_FusedRNNMixin, nn.GRU):
    """``torch.nn.GRU`` on fused kernels; extra keyword ``backend``."""


class RNN(_FusedRNNMixin, nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on fused kernels; extra keyword ``backend``."""


class _FusedCellMixin(_BackendArg):
    """forward() for the single-step cells: a length-1 sequence through the same backends."""

    def _cell(self):
        if isinstance(self, nn.LSTMCell):
            return CELLS["lstm"]
        if isinstance(self, nn.GRUCell):
            return CELLS["gru"]
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return CELLS["rnn_" + self.nonlinearity]

    def forward(self, input: Tensor, hx=None):
        name = type(self).__name__
        cell = self._cell()
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: expected a Tensor input, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        if x.size(1) != self.input_size:
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.size(1)} "
                               f"expected {self.input_size}")
        if x.dtype != self.weight_ih.dtype:
            raise RuntimeError(f"{name}: input dtype ({x.dtype}) does not match weight dtype "
                               f"({self.weight_ih.dtype})")
        batch = x.size(0)
        if hx is None:
            zeros = torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
            states = [zeros, zeros] if cell.has_cell_state else [zeros]
        else:
            states = list(hx) if cell.has_cell_state else [hx]
            if cell.has_cell_state and len(states) != 2:
                raise RuntimeError(f"{name}: hx must be a tuple (h_0, c_0)")
            for idx, s in enumerate(states):
                if not isinstance(s, Tensor):
                    raise TypeError(f"{name}: hidden states must be Tensors, got {type(s).__name__}")
                if s.dim() not in (1, 2):
                    raise ValueError(f"{name}: Expected hx[{idx}] to be 1D or 2D, got {s.dim()}D instead")
                if (s.dim() == 2) != is_batched:
                    raise RuntimeError(f"{name}: batched input needs batched (2-D) hidden states "
                                       f"and unbatched input 1-D ones")
            states = [s if is_batched else s.unsqueeze(0) for s in states]
            for s in states:
                if tuple(s.shape) != (batch, self.hidden_size):
                    raise RuntimeError(f"{name}: Expected hidden size {(batch, self.hidden_size)}, "
                                       f"got {tuple(s.shape)}")
        _check_device(name, x, self.weight_ih, states)
        _check_state_dtype(name, x, states)
        batch_sizes = torch.tensor([batch], dtype=torch.int64)
        _, h, c = rnn_layer(cell, x, batch_sizes, states[0], states[1] if cell.has_cell_state else None,
                            self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None,
                            reverse=False, backend=self.backend)
        if not is_batched:
            h = h.squeeze(0)
            c = c.squeeze(0) if c is not None else None
        return (h, c) if cell.has_cell_state else h


class LSTMCell(_FusedCellMixin, nn.LSTMCell):
    """``torch.nn.LSTMCell`` on fused kernels; extra keyword ``backend``."""


class GRUCell(_FusedCellMixin, nn.GRUCell):
    """``torch.nn.GRUCell`` on fused kernels; extra keyword ``backend``."""


class RNNCell(_FusedCellMixin, nn.RNNCell):
    """``torch.nn.RNNCell`` on fused kernels; extra keyword ``backend``."""


_FUSED_FOR = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
              nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _fused_copy(module: nn.Module, backend: str) -> nn.Module:
    """The fused twin of a torch.nn module, sharing its very Parameters (optimizers keep working)."""
    fused = _FUSED_FOR[type(module)].__new__(_FUSED_FOR[type(module)])
    # own containers (parameter dict, hooks, flat-weight list), the same Parameter objects
    fused.__dict__.update({k: v.copy() if isinstance(v, (dict, list)) else v
                           for k, v in module.__dict__.items()})
    fused.backend = dispatch.check_name(backend)
    return fused


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every torch.nn LSTM/GRU/RNN (and *Cell) inside ``model`` for its fusedrnn twin.

    The weights are shared, not copied. A module used in several places (a tied encoder and
    decoder) becomes one fused module used in the same places. A bare recurrent module is
    returned converted.
    """
    return _convert(model, backend, {})


def _convert(model: nn.Module, backend: str, done: dict) -> nn.Module:
    if id(model) not in done:
        if type(model) in _FUSED_FOR:
            done[id(model)] = _fused_copy(model, backend)
        else:
            done[id(model)] = model
            # every slot, repeats included (named_children() yields a shared module once)
            for child_name, child in list(model._modules.items()):
                if child is not None:
                    setattr(model, child_name, _convert(child, backend, done))
    return done[id(model)]
