"""Triton backends: ``triton:persistent`` (one launch per layer-direction) and
``triton:alternating`` (a torch matmul plus one fused pointwise launch per step).

Both are ``torch.autograd.Function``s with fused backward kernels; the weight gradients
are large GEMMs after the backward loop. Triton is imported on first use (this module is
itself only imported by dispatch when asked for), so ``TRITON_INTERPRET=1`` set before that
makes the kernels run on CPU tensors in Triton's interpreter.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import List, Optional

import torch
from .base import Backend, step_rows
from .reference import run_sequence
from .transforms import (differentiable_vjp, needs_differentiable_backward,
                         transformable_function, under_transform)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# On-chip budget of the persistent kernel, in bytes of W_hh held by one program.
# See PersistentBackend.unsupported_reason for the derivation.
PERSISTENT_W_BUDGET = 96 * 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mode_mismatch() -> Optional[str]:
    """Why Triton cannot run here, when its own library was built for the other mode.

    Triton turns each ``@triton.jit`` function into an interpreted or a compiled one when its
    module is imported, by TRITON_INTERPRET at that moment, and its standard library is
    imported with ``triton``. Set after that, the variable makes our kernels interpreted but
    not the library they call, and every launch fails with "Cannot call @triton.jit'd outside
    of the scope of a kernel". Only looked at once triton is imported (never imports it).
    """
    if "triton" not in sys.modules:
        return None
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(standard.zeros_like, InterpretedFunction) == _interpreting():
        return None
    now = "set" if _interpreting() else "unset"
    return (f"TRITON_INTERPRET=1 was {now} after triton was imported, so Triton's library is "
            f"in the other mode; set (or unset) it before the first `import triton`, e.g. in "
            f"the shell or at the top of the script")


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _padded(hidden: int) -> int:
    """Width of the persistent kernel's on-chip tiles: tl.arange needs a power of two and
    tl.dot at least 16."""
    return max(16, _next_pow2(hidden))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels():
    """Import the kernel modules (and Triton) on first use."""
    from ..kernels import persistent, pointwise
    return pointwise, persistent


def _traits(cell, backward: bool):
    """The cell's math and traits as the generic kernels' constexprs (kernels/pointwise.py)."""
    fwd, bwd = cell.triton_math()
    traits = dict(G=cell.gates, HAS_C=cell.has_cell_state)
    if backward:
        return dict(traits, BWD=bwd, READS_H=cell.reads_h, SPLIT_HG=cell.split_hidden_grad)
    return dict(traits, FWD=fwd)


def _prev_step(t: int, steps: int, reverse: bool) -> Optional[int]:
    """The step whose state step t reads (None: the initial state)."""
    p = t + 1 if reverse else t - 1
    return p if 0 <= p < steps else None


def _h_prev_rows(sizes: List[int], offsets: List[int], reverse: bool, device) -> torch.Tensor:
    """Row index into ``cat([h0, y])`` of every row's h_prev, for the dW_hh GEMM."""
    batch = sizes[0]
    parts = []
    for t, n in enumerate(sizes):
        rows = torch.arange(n)
        p = _prev_step(t, len(sizes), reverse)
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


class _Sequence(torch.autograd.Function):
    """(path, cell, batch_sizes, reverse, save, xp, h0, c0, w_hh, b_hh, w_hr) -> (y, h_n, c_n);
    ``path`` runs the forward and backward loops. The form autograd calls cheapest (see
    cpu._Layer); torch.func needs ``_TransformableSequence``."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _forward_saving(*inputs)
        _save(ctx, inputs, outputs)
        return outputs[:3]

    backward = staticmethod(_backward)


_TransformableSequence = transformable_function("_TransformableSequence", _forward_saving,
                                                _save, _backward, _reference)


class _TritonBackend(Backend):
    def unavailable_reason(self) -> Optional[str]:
        if not _triton_installed():
            return "triton is not installed (pip install 'fusedrnn[triton]')"
        if not torch.cuda.is_available() and not _interpreting():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        return _mode_mismatch()

    def unsupported_reason(self, spec):
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} is not supported (float32, float16, bfloat16 are)"
        if spec.device.type == "cpu" and not _interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        if spec.device.type not in ("cpu", "cuda"):
            return f"device {spec.device.type} is not supported"
        if spec.cell.triton_math is None:
            return f"cell {spec.cell.name!r} has no Triton math (Cell.triton_math)"
        if spec.cell.gates > 4:
            return f"the kernels load at most 4 gate tiles, {spec.cell.name!r} has {spec.cell.gates}"
        return super().unsupported_reason(spec)

    def sequence(self, xp, args):
        cell, batch_sizes, reverse = args.cell, args.batch_sizes, args.reverse
        tensors = [t.contiguous() if t is not None else None
                   for t in (xp, args.h0, args.c0, args.w_hh, args.b_hh, args.w_hr)]
        if under_transform():
            return _TransformableSequence.apply(self, cell, batch_sizes, reverse, True,
                                                *tensors)[:3]
        # inference (no_grad, or nothing requiring grad) skips writing what backward reads
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return _Sequence.apply(self, cell, batch_sizes, reverse, save, *tensors)


class AlternatingBackend(_TritonBackend):
    """Per step: ``hg = h W_hh^T + b_hh`` by torch matmul, then one fused pointwise kernel."""

    name = "triton:alternating"
    BR = 16  # rows per pointwise tile (16 x 64 keeps the GRU backward spill-free at 4 warps)

    def _grid(self, n, hidden):
        bh = min(64, _next_pow2(hidden))
        return (_cdiv(n, self.BR), _cdiv(hidden, bh)), bh

    def forward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, b_hh, w_hr, save):
        pointwise, _ = _kernels()
        rows, hidden = xp.shape[0], w_hh.shape[0] // cell.gates
        lstm = cell.has_cell_state
        y = xp.new_empty(rows, h0.shape[1])
        h = h0.clone()
        c = c0.float() if lstm else None  # .float() copies unless c0 is already fp32
        if lstm and c is c0:
            c = c0.clone()
        # without save, hg and m live in one step-sized buffer (rows [0, n) of step t)
        hg_all = torch.empty_like(xp) if save else xp.new_empty(sizes[0], xp.shape[1])
        c_all = xp.new_empty(rows, hidden, dtype=torch.float32) if lstm and save else y
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
            grid, bh = self._grid(n, hidden)
            pointwise.step_fwd_kernel[grid](
                xp[off:], hg, h, c if lstm else y, out, c_all[off:] if save else y, n, hidden,
                **_traits(cell, backward=False), READS_H=cell.reads_h, WRITE_H=w_hr is None,
                SAVE=save, BR=self.BR, BH=bh)
            if w_hr is not None:
                torch.mm(out, w_hr.t(), out=y[off:off + n])
                h[:n] = y[off:off + n]
        c_n = c.to(xp.dtype) if lstm else None
        saved = [hg_all] + ([c_all] if lstm else []) + ([m_all] if w_hr is not None else [])
        return y, h, c_n, saved if save else []

    def backward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, w_hr, y, saved,
                      dy, dh_n, dc_n):
        pointwise, _ = _kernels()
        hidden = w_hh.shape[0] // cell.gates
        lstm = cell.has_cell_state
        hg_all, *rest = saved
        c_all = rest.pop(0) if lstm else None
        m_all = rest.pop(0) if w_hr is not None else None
        dh = dh_n.float().clone()
        dc = dc_n.float().clone() if lstm else None
        dxp = torch.empty_like(xp)
        dhg = torch.empty_like(xp) if cell.split_hidden_grad else dxp
        dh_total = torch.empty_like(y) if w_hr is not None else None
        steps = len(sizes)
        for t in (range(steps) if reverse else reversed(range(steps))):
            n, off = sizes[t], offsets[t]
            p = _prev_step(t, steps, reverse)
            n_prev, off_prev = (sizes[p], offsets[p]) if p is not None else (0, 0)
            if w_hr is not None:  # h = m W_hr^T: the kernel gets dm
                dh_total[off:off + n] = dh[:n] + dy[off:off + n]
                dh_cell, dy_cell = dh_total[off:off + n].mm(w_hr), None
            else:
                dh_cell, dy_cell = dh, dy[off:]
            grid, bh = self._grid(n, hidden)
            pointwise.step_bwd_kernel[grid](
                xp[off:], hg_all[off:], y[off_prev:], h0, c_all[off_prev:] if lstm else y,
                c0 if lstm else y, n_prev, dh_cell, dy_cell if dy_cell is not None else y,
                dc if lstm else y, dxp[off:], dhg[off:], n, hidden,
                **_traits(cell, backward=True), HAS_DY=dy_cell is not None, BR=self.BR, BH=bh)
            if cell.reads_h:  # the kernel left the direct term in dh[:n]
                dh[:n] += dhg[off:off + n].mm(w_hh)
            else:
                dh[:n] = dhg[off:off + n].mm(w_hh)
        d_w_hr = dh_total.t().mm(m_all) if w_hr is not None else None
        return dxp, dhg, dh.to(xp.dtype), dc.to(xp.dtype) if lstm else None, d_w_hr


class PersistentBackend(_TritonBackend):
    """One launch per layer-direction; W_hh, h and c stay on chip for the whole sequence."""

    name = "triton:persistent"

    def unsupported_reason(self, spec):
        """Adds the persistent kernel's limits to the base checks.

        On-chip size limit: a program holds W_hh for the whole sequence as G gate tiles of
        ``HP x HP`` (HP = hidden size rounded up to a power of two, at least 16), i.e.
        ``G * HP^2 * itemsize`` bytes, which must not exceed PERSISTENT_W_BUDGET (96 KiB).
        Derivation, from ``triton.compile`` for sm_80 and sm_90 (fusedrnn/kernels/README.md has the
        table; tests/test_kernels_triton.py re-checks the largest admitted configs):
        Triton keeps the loop-invariant W operand of ``tl.dot`` in shared memory, and a
        kernel's shared use is W plus up to ~50 KB of layout-conversion scratch (backward;
        ~8 KB forward; W twice for fp32 on sm_90, whose "tf32x3" dot splits it). The
        largest admitted tiles (GRU 16-bit HP=128: 96 KB; LSTM fp32 HP=64: 64 KB) then need
        at most 131 KB (sm_80) / 184 KB (sm_90) per block, within the 163 KB / 227 KB
        limits, with no local-memory spills at 8 warps. The next size up (LSTM 16-bit
        HP=128, 128 KB) needs 180 KB in the backward, over sm_80's limit, and spills.
        """
        reason = super().unsupported_reason(spec)
        if reason:
            return reason
        if spec.proj_size:
            return "proj_size is not supported by the persistent kernel"
        hp = _padded(spec.hidden_size)
        w_bytes = spec.cell.gates * hp * hp * spec.dtype.itemsize
        if w_bytes > PERSISTENT_W_BUDGET:
            return (f"W_hh of {spec.cell.name} at hidden {spec.hidden_size} (tiles padded to "
                    f"{hp}) takes {w_bytes // 1024} KiB in {spec.dtype}, over the persistent "
                    f"kernel's on-chip budget of {PERSISTENT_W_BUDGET // 1024} KiB per program")
        return None

    @staticmethod
    def _launch(kernel, batch, hidden, xp, *args, **constexprs):
        """Launch with a fixed tile in the interpreter, autotuned (BB, num_warps) on a GPU."""
        import triton.language as tl

        from ..kernels.persistent import fp32_precision
        arch_major = torch.cuda.get_device_capability(xp.device)[0] if xp.is_cuda else 0
        dot_dtype = {torch.float32: tl.float32, torch.float16: tl.float16,
                     torch.bfloat16: tl.bfloat16}[xp.dtype]
        if xp.dtype == torch.bfloat16 and _interpreting():
            dot_dtype = tl.float32  # the interpreter's bf16 tl.dot gives wrong results
        constexprs.update(DOT_DTYPE=dot_dtype, FP32_PRECISION=fp32_precision(arch_major),
                          HP=_padded(hidden))
        tuned = _tuned(kernel)
        if tuned is kernel:
            constexprs.update(BB=16, num_warps=4)
        tuned[lambda meta: (_cdiv(batch, meta["BB"]),)](xp, *args, **constexprs)

    def forward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, b_hh, w_hr, save):
        _, persistent = _kernels()
        rows, hidden = xp.shape[0], h0.shape[1]
        lstm = cell.has_cell_state
        y = xp.new_empty(rows, hidden)
        hg_all = xp.new_empty(xp.shape, dtype=torch.float32) if save else y
        c_all = xp.new_empty(rows, hidden, dtype=torch.float32) if lstm and save else y
        h_n = torch.empty_like(h0)
        c_n = torch.empty_like(c0) if lstm else y
        dev_sizes = torch.tensor(sizes, dtype=torch.int32, device=xp.device)
        dev_offsets = torch.tensor(offsets, dtype=torch.int32, device=xp.device)
        self._launch(
            persistent.sequence_fwd_kernel, sizes[0], hidden,
            xp, dev_sizes, dev_offsets, len(sizes), h0, c0 if lstm else h0, w_hh,
            b_hh if b_hh is not None else w_hh, y, hg_all, c_all, h_n, c_n, hidden,
            **_traits(cell, backward=False), HAS_BIAS=b_hh is not None, REVERSE=reverse,
            SAVE=save)
        saved = [hg_all, dev_sizes, dev_offsets] + ([c_all] if lstm else [])
        return y, h_n, (c_n if lstm else None), saved

    def backward_loop(self, cell, sizes, offsets, reverse, xp, h0, c0, w_hh, w_hr, y, saved,
                      dy, dh_n, dc_n):
        _, persistent = _kernels()
        hidden = h0.shape[1]
        lstm = cell.has_cell_state
        hg_all, dev_sizes, dev_offsets, *rest = saved
        c_all = rest[0] if lstm else y
        dxp = torch.empty_like(xp)
        dhg = torch.empty_like(xp) if cell.split_hidden_grad else dxp
        dh0 = torch.empty_like(h0)
        dc0 = torch.empty_like(c0) if lstm else None
        self._launch(
            persistent.sequence_bwd_kernel, sizes[0], hidden,
            xp, hg_all, y, h0, c_all, c0 if lstm else h0, dev_sizes, dev_offsets, len(sizes),
            w_hh, dy, dh_n, dc_n if lstm else h0, dxp, dhg, dh0,
            dc0 if lstm else dh0, hidden, **_traits(cell, backward=True), REVERSE=reverse)
        return dxp, dhg, dh0, dc0, None


_TUNED = {}


def _tuned(kernel):
    """The kernel itself in the interpreter; on a GPU, autotuned over the batch tile and
    warps, keyed on the hidden size and the cell's shape (gates, cell state; the autotuner adds
    the tensors' dtypes)."""
    if _interpreting():
        return kernel
    if kernel not in _TUNED:
        import triton
        configs = [triton.Config({"BB": 16}, num_warps=w) for w in (4, 8, 16)] \
            + [triton.Config({"BB": 32}, num_warps=8)]
        _TUNED[kernel] = triton.autotune(configs, key=["H", "G", "HAS_C"])(kernel)
    return _TUNED[kernel]


PERSISTENT = PersistentBackend()
ALTERNATING = AlternatingBackend()
