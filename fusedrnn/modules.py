"""Drop-in replacements for torch.nn's recurrent layers and cells.

They subclass the torch.nn classes, so constructor arguments, parameter names,
``state_dict`` keys and ``isinstance`` checks are torch.nn's own. ``forward`` only
translates the torch.nn input forms (padded, batch_first, unbatched, PackedSequence)
into time-major rows with per-step counts and calls ``functional.rnn_stack`` once (the
cells: ``functional.rnn_layer``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import dispatch
from .backend.base import LayerArgs, LayerSpec, StackArgs
from .cells import Cell, cell_for_mode
from .functional import rnn_layer, rnn_stack


def _check_devices(x: Tensor, weight: Tensor, states: List[Tensor]) -> None:
    """torch.nn's device checks, in its words (code and tests match on them)."""
    if x.device != weight.device:
        raise RuntimeError("Input and parameter tensors are not at the same device, found input "
                           f"tensor at {x.device} and parameter tensor at {weight.device}")
    for s in states:
        if s.device != x.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found "
                               f"input tensor at {x.device} and hidden tensor at {s.device}")


def _check_state_dtype(module_name: str, x: Tensor, states: List[Tensor]) -> None:
    for s in states:
        if s.dtype != x.dtype:
            raise RuntimeError(f"{module_name}: hidden state dtype ({s.dtype}) does not match "
                               f"input dtype ({x.dtype})")


def _step_counts(batch_sizes: Tensor, rows: int, makes_zero_state: bool,
                 checks_state: bool) -> Tensor:
    """A PackedSequence's per-step row counts, checked so that no backend ever reads past its
    rows: 1-D int64, non-negative, non-increasing, summing to at most ``rows`` (torch.nn
    ignores rows past the sum; so do we).

    The exception classes are torch.nn's, whose checks are accidental: an IndexError from
    ``batch_sizes[0]``; a TypeError from ``torch.zeros(batch_sizes[0])`` when it makes the
    zero state, else a ValueError from ``int(batch_sizes[0])`` when it checks the given state
    (not for LSTM); RuntimeErrors from its C++. Where torch.nn accepts counts that do not fit
    (increasing ones with an LSTM state) it reads past the rows; fusedrnn raises.
    """
    first = batch_sizes[0]
    if first.numel() != 1 or first.is_floating_point() or first.is_complex():
        problem = (f"batch_sizes must be a 1-D tensor of integer step counts, got shape "
                   f"{tuple(batch_sizes.shape)} and dtype {batch_sizes.dtype}")
        if makes_zero_state:
            raise TypeError(problem)
        if first.numel() != 1:  # (torch.nn's LSTM reads such counts in ways of its own)
            raise (ValueError if checks_state else RuntimeError)(problem)
    if batch_sizes.dtype != torch.int64:
        raise RuntimeError(f"batch_sizes must be int64 (expected scalar type Long but found "
                           f"{batch_sizes.dtype})")
    counts = batch_sizes.reshape(-1)
    if bool((counts < 0).any()) or bool((counts[1:] > counts[:-1]).any()):
        raise RuntimeError(f"batch_sizes must be non-negative and non-increasing, got "
                           f"{counts.tolist()}")
    total = int(counts.sum())
    if total > rows:
        raise RuntimeError(f"batch_sizes sum to {total} but the packed data has {rows} rows")
    return counts


_WEIGHT_NAMES: Dict[Tuple[int, bool], Tuple[str, ...]] = {}


def _weight_names(num_layers: int, bidirectional: bool) -> Tuple[str, ...]:
    """torch.nn's names of a module's weights, five per layer and direction in torch.nn's
    order (``weight_hr`` and the biases whether or not the module has them). Memoized in a
    plain dict, which torch.compile traces (it warns on functools.lru_cache)."""
    names = _WEIGHT_NAMES.get((num_layers, bidirectional))
    if names is None:
        names = _WEIGHT_NAMES[(num_layers, bidirectional)] = tuple(
            f"{kind}_l{layer}{suffix}" for layer in range(num_layers)
            for suffix in (("", "_reverse") if bidirectional else ("",))
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
    return names


def _cpu_autocast_dtype(mode: str, x: Tensor, proj_size: int = 0, packed: bool = False,
                        cell: bool = False) -> Optional[torch.dtype]:
    """The dtype torch.nn's layer computes in under CPU autocast, whose policy differs per layer
    (torch 2.13, measured; ``tests/test_autocast.py``): RNN and RNNCell, and LSTM with
    ``proj_size``, run in the autocast dtype; LSTM without it only through oneDNN (padded or
    unbatched input with oneDNN on; float16 there is torch.nn's RuntimeError); GRU, GRUCell,
    LSTMCell and a packed LSTM stay float32. None: no CPU autocast over float32 input."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    if mode == "GRU" or (mode == "LSTM" and (cell or (not proj_size and (
            packed or not torch.backends.mkldnn.enabled)))):
        return torch.float32
    if mode == "LSTM" and not proj_size and dtype == torch.float16:
        raise RuntimeError("LSTM: torch.nn's LSTM has no float16 path under CPU autocast "
                           "(oneDNN's LSTM primitive refuses it), so neither has fusedrnn")
    return dtype


def _lowered(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` in ``dtype`` where autocast would cast it (float32 tensors only)."""
    return t.to(dtype) if t is not None and dtype is not None and t.dtype == torch.float32 else t


def _autocast_off(dtype: Optional[torch.dtype]):
    """Under CPU autocast (``dtype`` given) the layers run with it off, in ``dtype``."""
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", enabled=False)


class _Layout(NamedTuple):
    """How the caller's input was laid out, to give the output back the same way."""
    packed: Optional[PackedSequence]  # the input, when it was one
    is_batched: bool
    steps: int
    batch: int


class _BackendArg:
    """The one constructor argument fusedrnn adds to torch.nn's, ``backend``, and TorchScript,
    which cannot compile fusedrnn's forward nor record its ops: ``torch.jit.script`` compiles
    the torch.nn twin and ``torch.jit.trace`` records torch.nn's forward (its ``aten`` RNN op,
    which runs at any shape), on the same Parameters."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = dispatch.check_name(backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in this module's place (torch.jit also puts it into
        the parent module being scripted, as it does for every module with this hook)."""
        twin = _twin(self, next(c for c in type(self).__mro__ if c in _FUSED_FOR))
        del twin.backend
        warnings.warn(f"torch.jit.script: fusedrnn's {type(self).__name__} is compiled as "
                      f"torch.nn's {type(twin).__name__} on the same weights (TorchScript cannot "
                      "run fusedrnn's ops); torch.jit also puts that module in its place in the "
                      "parent module scripted", stacklevel=2)
        return twin


class _FusedRNNMixin(_BackendArg):
    """forward() for LSTM, GRU and RNN; the torch.nn base class provides everything else.

    The input forms, the hidden-state checks and their order follow torch.nn's ``forward``,
    so that a bad input raises what torch.nn raises."""

    def _cell(self) -> Cell:
        return cell_for_mode(self.mode)

    def _weights(self, dtype: Optional[torch.dtype]) -> List[Optional[Tensor]]:
        """Five weights per layer and direction (``StackArgs.weights``), None where the module
        has none, cast to ``dtype`` if given (CPU autocast). Read as torch.nn reads them: a
        weight that is not a plain Parameter (``torch.nn.utils.parametrize``; the hook-based
        ``weight_norm`` and ``prune``) is looked up as an attribute, which computes it."""
        params = self._parameters  # (nn.Module.__getattr__ per weight costs more than this)
        weights = [params[name] if name in params else getattr(self, name, None)
                   for name in _weight_names(self.num_layers, self.bidirectional)]
        return weights if dtype is None else [_lowered(w, dtype) for w in weights]

    def forward(self, input, hx=None):
        if torch.jit.is_tracing():  # (see _BackendArg)
            return super().forward(input, hx)
        rows, batch_sizes, layout = self._time_major_rows(input, hx is None)
        states = self._initial_states(hx, rows, batch_sizes, layout)
        dtype = _cpu_autocast_dtype(self.mode, rows, self.proj_size, layout.packed is not None)
        with _autocast_off(dtype):  # torch.nn's choice under CPU autocast, on every backend
            output, hidden = self._run_layers(_lowered(rows, dtype), batch_sizes,
                                              [_lowered(s, dtype) for s in states], dtype)
        return self._in_callers_layout(output, hidden, layout)

    def _time_major_rows(self, input, makes_zero_state: bool):
        """``(x, batch_sizes [T] int64, layout)``: x is the packed rows ``[sum(batch_sizes), I]``
        or the padded input time-major ``[T, B, I]`` (a view)."""
        if isinstance(input, PackedSequence):
            x = input.data
            rows = x.shape[0] if x.dim() else 0
            counts = _step_counts(input.batch_sizes, rows, makes_zero_state,
                                  checks_state=self.mode != "LSTM")
            if self.mode == "LSTM" and int(counts[0]) == 0 and rows > 0:
                # (torch.nn's LSTM fails here, its other RNNs return no rows)
                raise RuntimeError(f"batch_sizes start with 0 but the packed data has {rows} rows")
            if self.bidirectional and int(counts.sum()) != rows:
                # torch.nn's reverse direction then reads other rows than its forward one
                raise RuntimeError(f"batch_sizes sum to {int(counts.sum())} but the packed data "
                                   f"has {rows} rows (a bidirectional layer needs them equal)")
            steps = counts.numel()
            if x.dim() == 2:  # else check_forward_args names the rank
                x = x[:int(counts.sum())].contiguous()
            return x, counts, _Layout(input, True, steps, int(counts[0]))
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got "
                             f"{input.dim()}D instead")
        is_batched = input.dim() == 3
        x = input if is_batched else input.unsqueeze(0 if self.batch_first else 1)
        if self.batch_first:
            x = x.transpose(0, 1)  # [T, B, I]
        steps, batch = x.shape[0], x.shape[1]
        batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
        return x, batch_sizes, _Layout(None, is_batched, steps, batch)

    def _initial_states(self, hx, x, batch_sizes, layout) -> List[Tensor]:
        """[h0] or [h0, c0], each ``[layers * directions, B, H]``, in sorted batch order."""
        is_lstm = self.mode == "LSTM"
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        shape = (self.num_layers * directions, layout.batch)
        # check_forward_args reads the rank, the feature size and the batch of the input
        # torch.nn would see: time-major rows for packed input, [T, B, I] (batch_first=False)
        # otherwise
        probe = x if layout.packed is not None else (x.transpose(0, 1) if self.batch_first else x)
        if hx is None:
            h0 = torch.zeros(*shape, out_size, dtype=x.dtype, device=x.device)
            hx = (h0, torch.zeros(*shape, self.hidden_size, dtype=x.dtype, device=x.device)) \
                if is_lstm else h0
        elif layout.packed is not None:
            if is_lstm and layout.packed.sorted_indices is None and len(hx) != 2:
                raise RuntimeError(f"LSTM: hx must be a pair (h_0, c_0), got {len(hx)} tensors")
            try:  # (like torch.nn, a state with extra rows loses them here)
                hx = self.permute_hidden(hx, layout.packed.sorted_indices)
            except (RuntimeError, IndexError):
                self._check_forward_args(probe, hx, batch_sizes, layout)  # a clearer message
                raise
        else:
            states = (hx[0], hx[1]) if is_lstm else (hx,)
            want = 3 if layout.is_batched else 2
            if any(s.dim() != want for s in states):
                kind = "batched 3-D" if layout.is_batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                                   f"{tuple(s.dim() for s in states)}-D tensors")
            if not layout.is_batched:  # (an LSTM's extra states dropped, as torch.nn does)
                hx = tuple(s.unsqueeze(1) for s in states) if is_lstm else states[0].unsqueeze(1)
        if is_lstm and len(hx) != 2:
            raise RuntimeError(f"LSTM: hx must be a pair (h_0, c_0), got {len(hx)} tensors")
        self._check_forward_args(probe, hx, batch_sizes, layout)
        states = list(hx) if is_lstm else [hx]
        _check_devices(x, self.weight_ih_l0, states)
        _check_state_dtype(type(self).__name__, x, states)
        return states

    def _check_forward_args(self, probe, hx, batch_sizes, layout):
        """torch.nn's own checks. Its LSTM skips them for packed input and fails in C++ instead,
        so there a wrong dtype is a RuntimeError, not check_input's ValueError."""
        packed = layout.packed is not None
        try:
            self.check_forward_args(probe, hx, batch_sizes if packed else None)
        except ValueError as exc:
            if packed and self.mode == "LSTM":
                raise RuntimeError(str(exc)) from exc
            raise

    def _run_layers(self, x, batch_sizes, states, dtype):
        """Every layer and direction through ``functional.rnn_stack``, the weights cast to
        ``dtype`` if given; returns the last layer's rows and ``[h_n]`` or ``[h_n, c_n]``."""
        if batch_sizes.numel() == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        h0s = states[0].unbind(0)  # torch.nn's order: k = layer * directions + direction
        c0s = states[1].unbind(0) if len(states) == 2 else (None,) * len(h0s)
        stack = StackArgs(self._cell(), batch_sizes, h0s, c0s, self._weights(dtype),
                          self.bidirectional)
        dropout = self.dropout if self.training and self.num_layers > 1 else 0.0
        y, h_n, c_n = rnn_stack(x.reshape(-1, x.shape[-1]), stack, self.backend, dropout)
        return y, [h_n] + ([c_n] if len(states) == 2 else [])

    def _in_callers_layout(self, output, hidden, layout):
        hidden = tuple(hidden) if self.mode == "LSTM" else hidden[0]
        if layout.packed is not None:
            p = layout.packed
            return (PackedSequence(output, p.batch_sizes, p.sorted_indices, p.unsorted_indices),
                    self.permute_hidden(hidden, p.unsorted_indices))
        output = output.view(layout.steps, layout.batch, output.shape[-1])
        if self.batch_first:
            output = output.transpose(0, 1)
        if not layout.is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = tuple(s.squeeze(1) for s in hidden) if self.mode == "LSTM" \
                else hidden.squeeze(1)
        return output, hidden


class LSTM(_FusedRNNMixin, nn.LSTM):
    """``torch.nn.LSTM`` on fused kernels; extra keyword ``backend`` (see ``fusedrnn.backends()``)."""


class GRU(_FusedRNNMixin, nn.GRU):
    """``torch.nn.GRU`` on fused kernels; extra keyword ``backend``."""


class RNN(_FusedRNNMixin, nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on fused kernels; extra keyword ``backend``."""


class _FusedCellMixin(_BackendArg):
    """forward() for the single-step cells: a length-1 sequence through the same backends."""

    def _cell(self) -> Cell:
        if isinstance(self, nn.LSTMCell):
            return cell_for_mode("LSTM")
        if isinstance(self, nn.GRUCell):
            return cell_for_mode("GRU")
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return cell_for_mode("RNN_" + self.nonlinearity.upper())

    def forward(self, input: Tensor, hx=None):
        """torch.nn's checks in torch.nn's order (its C++ ones as RuntimeErrors), then a
        length-1 sequence through ``functional.rnn_layer``."""
        if torch.jit.is_tracing():  # (see _BackendArg)
            return super().forward(input, hx)
        name = type(self).__name__
        cell = self._cell()
        lstm = cell.has_cell_state
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = None if hx is None else (tuple(hx) if lstm else (hx,))
        for idx, s in enumerate(states or ()):
            if s.dim() not in (1, 2):
                what = f"hx[{idx}]" if lstm else "hidden"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        batch = x.size(0)
        if states is None:
            zeros = torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
            states = (zeros, zeros) if lstm else (zeros,)
        elif not is_batched:  # (an LSTMCell's extra states dropped, as torch.nn does)
            states = (states[0].unsqueeze(0), states[1].unsqueeze(0)) if lstm \
                else (states[0].unsqueeze(0),)
        if len(states) != (2 if lstm else 1):
            raise RuntimeError(f"{name}: hx must be a pair (h_0, c_0), got {len(states)} tensors")
        if x.size(1) != self.input_size:  # torch.nn's C++ checks, in its words
            raise RuntimeError(f"input has inconsistent input_size: got {x.size(1)} expected "
                               f"{self.input_size}")
        for i, s in enumerate(states):
            if s.dim() == 3:  # torch.nn crashes here (unbatched input, 2-D hx)
                raise RuntimeError(f"{name}: unbatched input needs 1-D hidden states, got a "
                                   f"2-D hidden{i}")
            if s.size(0) != batch:
                raise RuntimeError(f"Input batch size {batch} doesn't match hidden{i} batch size "
                                   f"{s.size(0)}")
            if s.dim() == 1:  # batched input, 1-D hx of batch-many elements: torch.nn's error
                raise IndexError("Dimension out of range (expected to be in range of [-1, 0], "
                                 "but got 1)")
            if s.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {s.size(1)}, "
                                   f"expected {self.hidden_size}")
        if x.dtype != self.weight_ih.dtype:
            raise RuntimeError(f"{name}: input dtype ({x.dtype}) does not match weight dtype "
                               f"({self.weight_ih.dtype})")
        for t in (self.weight_ih, *states):
            if t.device != x.device:  # torch.nn's words
                raise RuntimeError(f"Tensor on device {t.device} is not on the expected device "
                                   f"{x.device}!")
        _check_state_dtype(name, x, states)
        mode = "RNN" if not lstm and not isinstance(self, nn.GRUCell) else \
            ("LSTM" if lstm else "GRU")
        dtype = _cpu_autocast_dtype(mode, x, cell=True)
        with _autocast_off(dtype):
            args = LayerArgs(cell, torch.tensor([batch], dtype=torch.int64),
                             _lowered(states[0], dtype), _lowered(states[1], dtype) if lstm
                             else None, *[_lowered(w, dtype) for w in (
                                 self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)],
                             None, reverse=False)
            _, h, c = rnn_layer(_lowered(x, dtype), args, self.backend)
        if not is_batched:
            h = h.squeeze(0)
            c = c.squeeze(0) if c is not None else None
        return (h, c) if lstm else h


class LSTMCell(_FusedCellMixin, nn.LSTMCell):
    """``torch.nn.LSTMCell`` on fused kernels; extra keyword ``backend``."""


class GRUCell(_FusedCellMixin, nn.GRUCell):
    """``torch.nn.GRUCell`` on fused kernels; extra keyword ``backend``."""


class RNNCell(_FusedCellMixin, nn.RNNCell):
    """``torch.nn.RNNCell`` on fused kernels; extra keyword ``backend``."""


def resolved_backend(module: nn.Module, input=None) -> str:
    """The name of the backend a fusedrnn module runs on for input like ``input`` (a Tensor or
    PackedSequence; default: the module's own device and dtype), e.g. ``"cpu"``: what
    dispatch chose for it (once per configuration). Raises BackendUnavailableError where the
    forward would."""
    if not isinstance(module, (_FusedRNNMixin, _FusedCellMixin)):
        raise TypeError(f"not a fusedrnn module: {type(module).__name__}")
    like = input.data if isinstance(input, PackedSequence) else input
    weight = module.weight_ih if isinstance(module, _FusedCellMixin) else module.weight_ih_l0
    like = weight if like is None else like
    spec = LayerSpec(like.device, like.dtype, module._cell(), module.hidden_size,
                     getattr(module, "proj_size", 0))
    return dispatch.select(module.backend, spec).name


_FUSED_FOR = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
              nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _fused_class(module: nn.Module) -> type:
    """The fusedrnn class for a torch.nn recurrent module. A parametrized one
    (``torch.nn.utils.parametrize``: orthogonal, weight_norm, ...) has a class of parametrize's
    making over torch.nn's, whose properties compute the weights; its twin gets the same class
    body over the fusedrnn class."""
    fused = _FUSED_FOR[parametrize.type_before_parametrizations(module)]
    if not parametrize.is_parametrized(module):
        return fused
    body = {k: v for k, v in vars(type(module)).items()
            if k not in ("__module__", "__doc__", "__dict__", "__weakref__")}
    return type(f"Parametrized{fused.__name__}", (fused,), body)


def _twin(module: nn.Module, cls: type) -> nn.Module:
    """``module`` as an instance of ``cls`` (its fused or torch.nn counterpart): its own
    containers (parameter dict, hooks, flat-weight list), the very same Parameters (optimizers
    keep working) and parametrizations."""
    twin = cls.__new__(cls)
    twin.__dict__.update({k: v.copy() if isinstance(v, (dict, list)) else v
                          for k, v in module.__dict__.items()})
    return twin


def _fused_copy(module: nn.Module, backend: str) -> nn.Module:
    """The fused twin of a torch.nn module."""
    fused = _twin(module, _fused_class(module))
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
        if parametrize.type_before_parametrizations(model) in _FUSED_FOR:
            done[id(model)] = _fused_copy(model, backend)
        else:
            done[id(model)] = model
            # every slot, repeats included (named_children() yields a shared module once)
            for child_name, child in list(model._modules.items()):
                if child is not None:
                    setattr(model, child_name, _convert(child, backend, done))
    return done[id(model)]
