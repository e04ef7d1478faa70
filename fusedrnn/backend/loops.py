"""The sequence loops the GPU kernel families share (Triton and CUDA C++), and their autograd.

Two shapes of loop, each one class whose subclasses supply only the kernel launches:

- ``PerStepBackend``: per step, ``hg = h W_hh^T + b_hh`` by torch matmul (cuBLAS on a GPU),
  then one fused pointwise launch (``step_forward`` / ``step_backward``);
- ``PersistentBackend``: one launch per layer direction (``run_forward`` / ``run_backward``).

Both save the same things for the backward: the recurrent pre-activations ``hg_all`` and, for a
cell with a cell state, every step's ``c`` (``c_all``); the backward kernels recompute the
activations from them. The weight gradients are large GEMMs after the backward loop.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch

from .base import Backend, step_rows
from .reference import run_sequence
from .transforms import (differentiable_vjp, needs_differentiable_backward, plain_function,
                         transformable_function, under_transform)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels keep the cell state, gradients of the state and saved pre-activations
    in: fp32 for 16-bit storage, else the storage dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def prev_step(t: int, steps: int, reverse: bool) -> Optional[int]:
    """The step whose state step t reads (None: the initial state)."""
    p = t + 1 if reverse else t - 1
    return p if 0 <= p < steps else None


def _h_prev_rows(sizes: List[int], offsets: List[int], reverse: bool, device) -> torch.Tensor:
    """Row index into ``cat([h0, y])`` of every row's h_prev, for the dW_hh GEMM."""
    batch = sizes[0]
    parts = []
    for t, n in enumerate(sizes):
        rows = torch.arange(n)
        p = prev_step(t, len(sizes), reverse)
        if p is not None:
            rows = torch.where(rows < sizes[p], batch + offsets[p] + rows, rows)
        parts.append(rows)
    return torch.cat(parts).to(device)


def _reference(path, cell, batch_sizes, reverse, save, xp, h0, c0, w_hh, b_hh, w_hr):
    """The same sequence in the reference's torch ops: the source of every derivative the
    fused backward does not give (backend/transforms.py)."""
    return run_sequence(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse)


def _save(ctx, inputs, outputs):
    path, cell, batch_sizes, reverse, _, *tensors = inputs
    ctx.path, ctx.cell, ctx.reverse = path, cell, reverse
    ctx.save_for_backward(batch_sizes, *tensors, outputs[0], *outputs[3:])


def _backward(ctx, dy, dh_n, dc_n=None, *_):
    """The fused backward; the reference's vjp when the backward must itself be differentiable
    or runs under torch.func (backend/transforms.py)."""
    batch_sizes, xp, h0, c0, w_hh, b_hh, w_hr, y, *saved = ctx.saved_tensors
    if needs_differentiable_backward((dy, dh_n, dc_n)):
        inputs = (ctx.path, ctx.cell, batch_sizes, ctx.reverse, True, xp, h0, c0, w_hh, b_hh,
                  w_hr)
        return tuple(differentiable_vjp(_reference, inputs, (dy, dh_n, dc_n)))
    sizes, offsets = step_rows(batch_sizes)
    # the kernels index row-major: incoming gradients may be any strided view
    dy = torch.zeros_like(y) if dy is None else dy.contiguous()
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
    if c0 is not None:
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n.contiguous()
    dxp, dhg, dh0, dc0, d_w_hr = ctx.path.backward_loop(
        ctx.cell, sizes, offsets, ctx.reverse, xp, h0, c0, w_hh, w_hr, y, saved, dy, dh_n, dc_n)
    h_prev = torch.cat([h0, y])[_h_prev_rows(sizes, offsets, ctx.reverse, y.device)]
    d_w_hh = dhg.t().mm(h_prev)
    d_b_hh = dhg.sum(0) if b_hh is not None else None
    return None, None, None, None, None, dxp, dh0, dc0, d_w_hh, d_b_hh, d_w_hr


def _forward_saving(path, cell, batch_sizes, reverse, save, xp, h0, c0, w_hh, b_hh, w_hr):
    """(y, h_n, c_n, *saved); ``saved`` is empty unless ``save``."""
    sizes, offsets = step_rows(batch_sizes)
    y, h_n, c_n, saved = path.forward_loop(cell, sizes, offsets, reverse, xp, h0, c0, w_hh,
                                           b_hh, w_hr, save)
    return (y, h_n, c_n, *saved)


# (path, cell, batch_sizes, reverse, save, xp, h0, c0, w_hh, b_hh, w_hr) -> (y, h_n, c_n);
# ``path`` runs the forward and backward loops.
_Sequence = plain_function("_Sequence", _forward_saving, _save, _backward)
_TransformableSequence = transformable_function("_TransformableSequence", _forward_saving,
                                                _save, _backward, _reference)


def check_sequence_args(xp, args) -> None:
    """RuntimeError unless ``xp`` and ``args`` form one consistent layer direction (the
    interface in base.py). The modules only ever pass such arguments, but ``sequence`` is
    public, and a kernel handed a short or mis-shaped tensor would read or write past it."""
    def fail(what):
        raise RuntimeError(f"fusedrnn: {what}")

    sizes = args.batch_sizes
    if not (isinstance(sizes, torch.Tensor) and sizes.dtype == torch.int64 and sizes.dim() == 1
            and sizes.numel() > 0 and sizes.device.type == "cpu"):
        fail("batch_sizes must be a non-empty 1-D int64 CPU tensor")
    counts = sizes.tolist()  # an empty batch (all 0) is valid: torch.nn returns empty outputs
    if counts[0] < 0 or any(n < 0 or n > p for p, n in zip(counts, counts[1:])):
        fail(f"batch_sizes must be non-negative and non-increasing, got {counts}")
    if xp.dim() != 2 or xp.shape[0] != sum(counts):
        fail(f"xp must be [{sum(counts)} rows, G H] for batch_sizes summing to {sum(counts)}, "
             f"got {tuple(xp.shape)}")
    gates, w_hh = args.cell.gates, args.w_hh
    if w_hh.dim() != 2 or w_hh.shape[0] == 0 or w_hh.shape[0] % gates:
        fail(f"w_hh must be [{gates} * hidden, out], got {tuple(w_hh.shape)}")
    hidden, out = w_hh.shape[0] // gates, w_hh.shape[1]
    expected = {"xp": (xp, (xp.shape[0], gates * hidden)),
                "h0": (args.h0, (counts[0], out)),
                "c0": (args.c0, (counts[0], hidden) if args.cell.has_cell_state else None),
                "b_hh": (args.b_hh, (gates * hidden,) if args.b_hh is not None else None),
                "w_hr": (args.w_hr, (out, hidden) if args.w_hr is not None else None)}
    if args.w_hr is None and out != hidden:
        fail(f"w_hh is {tuple(w_hh.shape)}: its width must be the hidden size {hidden} "
             f"without w_hr")
    for name, (t, shape) in expected.items():
        if shape is None:
            if t is not None:
                fail(f"{name} must be None for this cell")
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            fail(f"{name} must have shape {shape}, got "
                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t}")
        if t.dtype != xp.dtype or t.device != xp.device:
            fail(f"{name} is {t.dtype} on {t.device}, xp {xp.dtype} on {xp.device}")
    if w_hh.dtype != xp.dtype or w_hh.device != xp.device:
        fail(f"w_hh is {w_hh.dtype} on {w_hh.device}, xp {xp.dtype} on {xp.device}")


def _sequence(path, xp, args):
    """``LoopBackend.sequence``: the autograd Function over ``path``'s loops."""
    cell, batch_sizes, reverse = args.cell, args.batch_sizes, args.reverse
    tensors = [t.contiguous() if t is not None else None
               for t in (xp, args.h0, args.c0, args.w_hh, args.b_hh, args.w_hr)]
    if under_transform():
        return _TransformableSequence.apply(path, cell, batch_sizes, reverse, True,
                                            *tensors)[:3]
    # inference (no_grad, or nothing requiring grad) skips writing what backward reads
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _Sequence.apply(path, cell, batch_sizes, reverse, save, *tensors)


_UNTRACED = []


def _untraced_sequence():
    """``_sequence`` behind torch.compiler.disable once torch.compile's machinery is loaded,
    else ``_sequence`` itself: wrapping it at import would import torch._dynamo (and with it
    Triton, before a user can set TRITON_INTERPRET) and cost a second."""
    if "torch._dynamo" not in sys.modules:
        return _sequence
    if not _UNTRACED:
        _UNTRACED.append(torch.compiler.disable(_sequence))
    return _UNTRACED[0]


class LoopBackend(Backend):
    """A backend whose ``sequence`` is the autograd Function above over its own
    ``forward_loop`` and ``backward_loop``.

    ``sequence`` is kept out of torch.compile's tracing: a compiled model runs these layers
    eagerly between its graphs. Dynamo cannot trace the CUDA kernels' ctypes launches (tracing
    into them corrupted the heap) nor Triton's interpreter (it raised), and compiled Triton
    kernels inside these loops were never run on a GPU."""

    def sequence(self, xp, args):
        check_sequence_args(xp, args)
        return _untraced_sequence()(self, xp, args)


class PerStepBackend(LoopBackend):
    """Per step: ``hg = h W_hh^T + b_hh`` by torch matmul, then one fused pointwise launch.

    Subclasses launch the two step kernels (the contract of kernels/pointwise.py):
    ``step_forward(cell, n, hidden, xg, hg, h, c, out, c_save, write_h, save)`` and
    ``step_backward(cell, n, hidden, xg, hg, h_prev, h0, c_prev, c0, n_prev, dh, dy, dc, dxg,
    dhg)``, where a tensor the cell does not use is any placeholder and ``dy`` may be None.
    """

    def forward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, b_hh, w_hr, save):
        rows, hidden = xp.shape[0], w_hh.shape[0] // cell.gates
        lstm = cell.has_cell_state
        y = xp.new_empty(rows, h0.shape[1])
        h = h0.clone()
        acc = acc_dtype(xp.dtype)
        c = c0.to(acc) if lstm else None  # .to copies unless c0 is already acc
        if lstm and c is c0:
            c = c0.clone()
        # without save, hg and m live in one step-sized buffer (rows [0, n) of step t)
        hg_all = torch.empty_like(xp) if save else xp.new_empty(sizes[0], xp.shape[1])
        c_all = xp.new_empty(rows, hidden, dtype=acc) if lstm and save else y
        m_all = None
        if w_hr is not None:
            m_all = xp.new_empty(rows if save else sizes[0], hidden)
        for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
            n, off = sizes[t], offsets[t]
            at = off if save else 0  # row of this step in the saved buffers
            hg = hg_all[at:at + n]
            if b_hh is not None:
                torch.addmm(b_hh, h[:n], w_hh.t(), out=hg)
            else:
                torch.mm(h[:n], w_hh.t(), out=hg)
            out = m_all[at:at + n] if w_hr is not None else y[off:off + n]
            self.step_forward(cell, n, hidden, xp[off:], hg, h, c if lstm else y, out,
                              c_all[off:] if save else y, w_hr is None, save)
            if w_hr is not None:
                torch.mm(out, w_hr.t(), out=y[off:off + n])
                h[:n] = y[off:off + n]
        c_n = c.to(xp.dtype) if lstm else None
        saved = [hg_all] + ([c_all] if lstm else []) + ([m_all] if w_hr is not None else [])
        return y, h, c_n, saved if save else []

    def backward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, w_hr, y, saved,
                      dy, dh_n, dc_n):
        lstm = cell.has_cell_state
        hg_all, *rest = saved
        c_all = rest.pop(0) if lstm else None
        m_all = rest.pop(0) if w_hr is not None else None
        acc = acc_dtype(xp.dtype)
        dh = dh_n.to(acc, copy=True)
        dc = dc_n.to(acc, copy=True) if lstm else None
        dxp = torch.empty_like(xp)
        dhg = torch.empty_like(xp) if cell.split_hidden_grad else dxp
        dh_total = torch.empty_like(y) if w_hr is not None else None
        steps = len(sizes)
        for t in (range(steps) if reverse else reversed(range(steps))):
            n, off = sizes[t], offsets[t]
            p = prev_step(t, steps, reverse)
            n_prev, off_prev = (sizes[p], offsets[p]) if p is not None else (0, 0)
            if w_hr is not None:  # h = m W_hr^T: the kernel gets dm
                dh_total[off:off + n] = dh[:n] + dy[off:off + n]
                dh_cell, dy_cell = dh_total[off:off + n].mm(w_hr), None
            else:
                dh_cell, dy_cell = dh, dy[off:]
            self.step_backward(cell, n, w_hh.shape[0] // cell.gates, xp[off:], hg_all[off:],
                               y[off_prev:], h0, c_all[off_prev:] if lstm else y,
                               c0 if lstm else y, n_prev, dh_cell, dy_cell,
                               dc if lstm else y, dxp[off:], dhg[off:])
            if cell.reads_h:  # the kernel left the direct term in dh[:n]
                dh[:n] += dhg[off:off + n].mm(w_hh)
            else:
                dh[:n] = dhg[off:off + n].mm(w_hh)
        d_w_hr = dh_total.t().mm(m_all) if w_hr is not None else None
        return dxp, dhg, dh.to(xp.dtype), dc.to(xp.dtype) if lstm else None, d_w_hr


class PersistentBackend(LoopBackend):
    """One launch per layer direction, forward and backward. Subclasses supply
    ``run_forward(cell, sizes, reverse, save, xp, dev_sizes, dev_offsets, h0, c0, w_hh, b_hh,
    y, hg_all, c_all, h_n, c_n)`` and ``run_backward(cell, sizes, reverse, xp, hg_all, y, h0,
    c_all, c0, dev_sizes, dev_offsets, w_hh, dy, dh_n, dc_n, dxp, dhg, dh0, dc0)``; a tensor a
    cell does not use is a placeholder. ``dev_sizes`` / ``dev_offsets`` are int32 on the
    device. No projection (``unsupported_reason`` says so)."""

    def forward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, b_hh, w_hr, save):
        rows, hidden = xp.shape[0], h0.shape[1]
        lstm = cell.has_cell_state
        y = xp.new_empty(rows, hidden)
        acc = acc_dtype(xp.dtype)
        hg_all = xp.new_empty(xp.shape, dtype=acc) if save else y
        c_all = xp.new_empty(rows, hidden, dtype=acc) if lstm and save else y
        h_n = torch.empty_like(h0)
        c_n = torch.empty_like(c0) if lstm else y
        dev_sizes = torch.tensor(sizes, dtype=torch.int32, device=xp.device)
        dev_offsets = torch.tensor(offsets, dtype=torch.int32, device=xp.device)
        self.run_forward(cell, sizes, reverse, save, xp, dev_sizes, dev_offsets,
                         h0, c0 if lstm else h0, w_hh, b_hh, y, hg_all, c_all, h_n, c_n)
        saved = [hg_all, dev_sizes, dev_offsets] + ([c_all] if lstm else [])
        return y, h_n, (c_n if lstm else None), saved

    def backward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, w_hr, y, saved,
                      dy, dh_n, dc_n):
        lstm = cell.has_cell_state
        hg_all, dev_sizes, dev_offsets, *rest = saved
        c_all = rest[0] if lstm else y
        dxp = torch.empty_like(xp)
        dhg = torch.empty_like(xp) if cell.split_hidden_grad else dxp
        dh0 = torch.empty_like(h0)
        dc0 = torch.empty_like(c0) if lstm else None
        self.run_backward(cell, sizes, reverse, xp, hg_all, y, h0, c_all, c0 if lstm else h0,
                          dev_sizes, dev_offsets, w_hh, dy, dh_n, dc_n if lstm else h0, dxp,
                          dhg, dh0, dc0 if lstm else dh0)
        return dxp, dhg, dh0, dc0, None
