"""The per-layer, per-direction interface every backend implements.

Input rows are time-major with per-step active-row counts (PackedSequence's
``batch_sizes``): step t owns ``batch_sizes[t]`` rows, the counts never increase, and a
padded batch is the case where every count is B. At step t only rows ``[0, batch_sizes[t])``
are computed; the other rows of the state buffer keep their last (or, in reverse, their
initial) state, which is exactly the final state torch.nn returns for packed input.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import FrozenSet, Mapping, NamedTuple, Optional, Sequence

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


class LayerSpec(NamedTuple):
    """What a backend is chosen by (and what dispatch caches its choice under)."""
    device: torch.device
    dtype: torch.dtype
    cell: Cell
    hidden_size: int
    proj_size: int = 0
    extras: FrozenSet[str] = frozenset()  # the names of the cell's extra parameters given
    masks: FrozenSet[str] = frozenset()   # the names of the masks given


_NO_NAMES: FrozenSet[str] = frozenset()


_NONE: Mapping[str, Tensor] = MappingProxyType({})


class LayerArgs(NamedTuple):
    """One layer and direction, as ``functional.rnn_layer`` hands it to every backend (a
    NamedTuple: it is built once per layer, direction and call).

    batch_sizes: [T] int64 on the CPU, non-increasing (checked by the modules); B = its first
    h0:          [B, Hout]   Hout = proj_size or H
    c0:          [B, H] for a cell with a cell state, else None
    w_ih, b_ih:  [G*H, I], [G*H] or None (``layer`` uses them; ``sequence`` gets xp instead)
    w_hh, b_hh:  [G*H, Hout], [G*H] or None;  w_hr: [Hout, H] or None (LSTM proj_size)
    extras:      the cell's extra parameters by name (``Cell.extra_params``)
    masks:       per-step masks by name (zoneout, variational dropout): room for the cells
                 that will use them; a backend that cannot honour one says so
    """
    cell: Cell
    batch_sizes: Tensor
    h0: Tensor
    c0: Optional[Tensor]
    w_ih: Optional[Tensor]
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor]
    reverse: bool
    extras: Mapping[str, Tensor] = _NONE
    masks: Mapping[str, Tensor] = _NONE

    @property
    def hidden_size(self) -> int:
        return self.w_hh.shape[0] // self.cell.gates

    def spec(self, x: Tensor) -> LayerSpec:
        return LayerSpec(x.device, x.dtype, self.cell, self.hidden_size,
                         self.w_hr.shape[0] if self.w_hr is not None else 0,
                         frozenset(self.extras) if self.extras else _NO_NAMES,
                         frozenset(self.masks) if self.masks else _NO_NAMES)


class StackArgs(NamedTuple):
    """Every layer and direction of a module at once, as ``functional.rnn_stack`` hands it to a
    backend: flat, in torch.nn's order (``k = layer * directions + direction``), so that a
    backend running the whole stack in one call passes the lists on as they are, and only the
    layer-by-layer path builds a ``LayerArgs`` per layer.

    h0s, c0s:    per k, as LayerArgs' h0 and c0 (c0s' entries None for a cell without c)
    weights:     five per k: w_ih, w_hh, b_ih, b_hh, w_hr (None where the module has none)
    """
    cell: Cell
    batch_sizes: Tensor
    h0s: Sequence[Tensor]
    c0s: Sequence[Optional[Tensor]]
    weights: Sequence[Optional[Tensor]]
    bidirectional: bool

    def layer(self, k: int) -> LayerArgs:
        return LayerArgs(self.cell, self.batch_sizes, self.h0s[k], self.c0s[k],
                         *self.weights[5 * k:5 * k + 5],
                         reverse=self.bidirectional and k % 2 == 1)

    def spec(self, x: Tensor) -> LayerSpec:
        w_hr = self.weights[4]
        hidden = self.weights[1].shape[0] // self.cell.gates
        return LayerSpec(x.device, x.dtype, self.cell, hidden,
                         w_hr.shape[0] if w_hr is not None else 0)


class Backend:
    """One way to run a layer. Subclasses implement ``sequence``; the availability checks and
    ``layer`` have defaults they override where needed."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when usable on this machine, else why not (missing extension, no GPU, ...)."""
        return None

    def unsupported_reason(self, spec: LayerSpec) -> Optional[str]:
        """None when this backend handles the layer, else why not. The default refuses extra
        parameters and masks: a backend that honours them says so by overriding this."""
        if spec.extras or spec.masks:
            return f"{self.name} does not take extra parameters or masks " \
                   f"({', '.join(sorted(spec.extras | spec.masks))})"
        return None

    def sequence(self, xp: Tensor, args: LayerArgs):
        """Run one layer and direction from its hoisted input projection
        ``xp = x @ W_ih^T + b_ih`` ([rows, G*H]); differentiable in every tensor argument.
        Returns ``y [rows, Hout], h_n [B, Hout], c_n [B, H] or None``."""
        raise NotImplementedError

    def layer(self, x: Tensor, args: LayerArgs):
        """The whole layer direction from its input rows ``x [rows, I]``.

        By default the hoisted input projection (one GEMM over every row) followed by
        ``sequence``; a kernel backend may override it to fuse the projection's bias and
        gradients into its own kernels.
        """
        return self.sequence(F.linear(x, args.w_ih, args.b_ih), args)

    def stack(self, x: Tensor, stack: StackArgs, dropout: float = 0.0):
        """Every layer of a module from its input rows ``x``: each layer's directions run by
        ``layer`` and their outputs concatenated; dropout with probability ``dropout``
        (training) is applied to each layer's output but the last. Returns the last layer's
        rows, ``h_n`` ``[L * D, B, Hout]`` and ``c_n`` ``[L * D, B, H]`` or None. A backend may
        override it to run the whole stack in one call."""
        directions = 2 if stack.bidirectional else 1
        layers = len(stack.h0s) // directions
        h_n, c_n = [], []
        for layer in range(layers):
            outputs = []
            for k in range(layer * directions, (layer + 1) * directions):
                y, h, c = self.layer(x, stack.layer(k))
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            if dropout and layer < layers - 1:
                x = F.dropout(x, dropout, training=True)
        return x, torch.stack(h_n), (torch.stack(c_n) if c_n[0] is not None else None)
