"""Triton backends: ``triton:persistent`` (one launch per layer-direction) and
``triton:alternating`` (a torch matmul plus one fused pointwise launch per step).

Both are the shared loops of backend/loops.py (its autograd Function, fused backward kernels,
weight gradients as large GEMMs after the backward loop) with Triton kernel launches. Triton is imported on first use (this module is
itself only imported by dispatch when asked for), so ``TRITON_INTERPRET=1`` set before that
makes the kernels run on CPU tensors in Triton's interpreter.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Optional

import torch
from . import loops

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


class _TritonBackend:
    """Availability and limits shared by both Triton paths."""

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


class AlternatingBackend(_TritonBackend, loops.PerStepBackend):
    """Per step: ``hg = h W_hh^T + b_hh`` by torch matmul, then one fused pointwise kernel."""

    name = "triton:alternating"
    BR = 16  # rows per pointwise tile (16 x 64 keeps the GRU backward spill-free at 4 warps)

    def _grid(self, n, hidden):
        bh = min(64, _next_pow2(hidden))
        return (_cdiv(n, self.BR), _cdiv(hidden, bh)), bh

    def step_forward(self, cell, n, hidden, xg, hg, h, c, out, c_save, write_h, save):
        pointwise, _ = _kernels()
        grid, bh = self._grid(n, hidden)
        pointwise.step_fwd_kernel[grid](
            xg, hg, h, c, out, c_save, n, hidden, **_traits(cell, backward=False),
            READS_H=cell.reads_h, WRITE_H=write_h, SAVE=save, BR=self.BR, BH=bh)

    def step_backward(self, cell, n, hidden, xg, hg, h_prev, h0, c_prev, c0, n_prev, dh, dy,
                      dc, dxg, dhg):
        pointwise, _ = _kernels()
        grid, bh = self._grid(n, hidden)
        pointwise.step_bwd_kernel[grid](
            xg, hg, h_prev, h0, c_prev, c0, n_prev, dh, dy if dy is not None else dh, dc, dxg,
            dhg, n, hidden, **_traits(cell, backward=True), HAS_DY=dy is not None, BR=self.BR,
            BH=bh)


class PersistentBackend(_TritonBackend, loops.PersistentBackend):
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

    def run_forward(self, cell, sizes, reverse, save, xp, dev_sizes, dev_offsets, h0, c0, w_hh,
                    b_hh, y, hg_all, c_all, h_n, c_n):
        _, persistent = _kernels()
        self._launch(
            persistent.sequence_fwd_kernel, sizes[0], h0.shape[1],
            xp, dev_sizes, dev_offsets, len(sizes), h0, c0, w_hh,
            b_hh if b_hh is not None else w_hh, y, hg_all, c_all, h_n, c_n, h0.shape[1],
            **_traits(cell, backward=False), HAS_BIAS=b_hh is not None, REVERSE=reverse,
            SAVE=save)

    def run_backward(self, cell, sizes, reverse, xp, hg_all, y, h0, c_all, c0, dev_sizes,
                     dev_offsets, w_hh, dy, dh_n, dc_n, dxp, dhg, dh0, dc0):
        _, persistent = _kernels()
        self._launch(
            persistent.sequence_bwd_kernel, sizes[0], h0.shape[1],
            xp, hg_all, y, h0, c_all, c0, dev_sizes, dev_offsets, len(sizes),
            w_hh, dy, dh_n, dc_n, dxp, dhg, dh0, dc0, h0.shape[1],
            **_traits(cell, backward=True), REVERSE=reverse)


_TUNED = {}


def _tuned(kernel):
    """The kernel itself in the interpreter or with FUSEDRNN_TRITON_AUTOTUNE=0 (one fixed
    config: fewer compiles, for tests); on a GPU, autotuned over the batch tile and warps,
    keyed on the hidden size and the cell's shape (gates, cell state; the autotuner adds the
    tensors' dtypes)."""
    if _interpreting() or os.environ.get("FUSEDRNN_TRITON_AUTOTUNE") == "0":
        return kernel
    if kernel not in _TUNED:
        import triton
        configs = [triton.Config({"BB": 16}, num_warps=w) for w in (4, 8, 16)] \
            + [triton.Config({"BB": 32}, num_warps=8)]
        _TUNED[kernel] = triton.autotune(configs, key=["H", "G", "HAS_C"])(kernel)
    return _TUNED[kernel]


PERSISTENT = PersistentBackend()
ALTERNATING = AlternatingBackend()
