"""CUDA C++ backends (csrc/cuda/kernels.h), on the shared loops of backend/loops.py:

- ``cuda:pointwise``: per step a torch GEMM (cuBLAS) and one fused pointwise kernel; any size.
- ``cuda:persistent``: one cooperative launch per layer direction and pass; block b owns a
  slice of hidden units and keeps its slice of W_hh in shared memory for the whole sequence.

With ``FUSEDRNN_CUDA_EMULATE=1`` both run on CPU tensors, the same kernel source executed by
csrc/cuda/emulate/emulate.h on CPU threads, in every dtype the GPU build has.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ..cells import built_cell_reason
from . import cuda_library as lib
from . import loops


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _library() -> lib.Library:
    """The loaded kernel library, or RuntimeError saying why there is none."""
    library, why = lib.load()
    if library is None:
        raise RuntimeError(f"fusedrnn CUDA kernels unavailable: {why}")
    return library


class _CudaKernels:
    """Availability and limits shared by both CUDA paths."""

    @staticmethod
    def threads() -> int:
        """Threads per block: 256 on a GPU (FUSEDRNN_CUDA_THREADS overrides it, a multiple of
        32, for measurements); 64 emulated (each is an OS thread there)."""
        if lib.emulating():
            return 64
        return int(os.environ.get("FUSEDRNN_CUDA_THREADS", "256"))

    def unavailable_reason(self) -> Optional[str]:
        return lib.load()[1]

    def unsupported_reason(self, spec):
        library = _library()
        emulated = library.mode == "emulated"
        device = "cpu" if emulated else "cuda"
        if spec.device.type != device:
            return (f"runs on {device} tensors {'(emulated) ' if emulated else ''}only, not "
                    f"{spec.device.type}")
        if spec.dtype not in lib.DTYPE_CODES:
            return f"supports float32, float64, float16 and bfloat16, not {spec.dtype}"
        return (built_cell_reason(spec.cell, library.cell_traits(spec.cell.name), "CUDA")
                or super().unsupported_reason(spec))


class PointwiseBackend(_CudaKernels, loops.PerStepBackend):
    name = "cuda:pointwise"

    def _launch(self, kernel, cell, n, hidden, like, **tensors):
        block = self.threads()
        args = lib.make_args(hidden=hidden, n=n, **tensors)
        # a thread per element on a GPU; emulated, 4 blocks loop over them (grid-stride)
        grid = _cdiv(n * hidden, block)
        _library().launch(kernel, cell.name, like.dtype, args, like.device,
                          min(grid, 4) if lib.emulating() else grid, block)

    def step_forward(self, cell, n, hidden, xg, hg, h, c, out, c_save, write_h, save):
        if n:
            self._launch(lib.POINTWISE_FORWARD, cell, n, hidden, xg, xp=xg, hg=hg, h=h, c=c,
                         out=out, c_all=c_save, write_h=int(write_h), save=int(save))

    def step_backward(self, cell, n, hidden, xg, hg, h_prev, h0, c_prev, c0, n_prev, dh, dy,
                      dc, dxg, dhg):
        if n:
            self._launch(lib.POINTWISE_BACKWARD, cell, n, hidden, xg, xp=xg, hg=hg,
                         h_prev=h_prev, h0=h0, c_prev=c_prev, c0=c0, n_prev=n_prev, dh=dh,
                         dy=dy, has_dy=int(dy is not None), dc=dc, dxp=dxg, dhg=dhg)


class PersistentBackend(_CudaKernels, loops.PersistentBackend):
    name = "cuda:persistent"

    def plan(self, cell_name: str, dtype: torch.dtype, hidden: int, device: int = 0):
        """(units per block, blocks) with every block resident for both passes, or a reason
        string. Units start at hidden / (blocks resident at one unit) and grow until the
        grid the occupancy API allows covers the hidden size."""
        return self._plan(cell_name, dtype, hidden, device, self.threads())

    @functools.lru_cache(maxsize=None)
    def _plan(self, cell_name, dtype, hidden, device, threads):
        library = _library()
        units = 1
        while units <= hidden:
            fits = []
            for kernel in (lib.PERSISTENT_FORWARD, lib.PERSISTENT_BACKWARD):
                # at the largest round of rows (any batch), so every batch fits the plan
                shared, _ = library.persistent_sizes(kernel, cell_name, dtype, hidden, 1 << 30,
                                                     units)
                resident, limit = library.resident_blocks(kernel, cell_name, dtype, device,
                                                          threads, shared)
                if shared > limit:
                    return (f"W_hh's slice for {units} hidden units per block needs {shared} "
                            f"bytes of shared memory, over this device's {limit} per block")
                fits.append(resident)
            blocks = _cdiv(hidden, units)
            if blocks <= min(fits):
                return units, blocks
            units = max(units + 1, _cdiv(hidden, max(min(fits), 1)))
        return "no split of the hidden units puts every block on chip at once"

    def unsupported_reason(self, spec):
        reason = super().unsupported_reason(spec)
        if reason:
            return reason
        if spec.proj_size:
            return ("proj_size is not supported by the persistent kernel (the projection "
                    "would need a second grid barrier per step)")
        plan = self.plan(spec.cell.name, spec.dtype, spec.hidden_size,
                         spec.device.index or 0 if spec.device.type == "cuda" else 0)
        return plan if isinstance(plan, str) else None

    def _run(self, kernel, cell, xp, batch, steps, reverse, **tensors):
        library = _library()
        hidden = xp.shape[1] // cell.gates
        device = xp.device.index or 0 if xp.is_cuda else 0
        units, blocks = self.plan(cell.name, xp.dtype, hidden, device)
        shared, scratch = library.persistent_sizes(kernel, cell.name, xp.dtype, hidden, batch,
                                                   units)
        scratch = xp.new_empty(scratch, dtype=loops.acc_dtype(xp.dtype))
        args = lib.make_args(hidden=hidden, batch=batch, steps=steps, units=units,
                             reverse=int(reverse), xp=xp, scratch=scratch, **tensors)
        library.launch(kernel, cell.name, xp.dtype, args, xp.device, blocks, self.threads(),
                       shared)

    def run_forward(self, cell, sizes, reverse, save, xp, dev_sizes, dev_offsets, h0, c0, w_hh,
                    b_hh, y, hg_all, c_all, h_n, c_n):
        self._run(lib.PERSISTENT_FORWARD, cell, xp, sizes[0], len(sizes), reverse,
                  save=int(save), sizes=dev_sizes, offsets=dev_offsets, h0=h0, c0=c0,
                  w_hh=w_hh, b_hh=b_hh, y=y, hg_all=hg_all, c_all=c_all, h_n=h_n, c_n=c_n)

    def run_backward(self, cell, sizes, reverse, xp, hg_all, y, h0, c_all, c0, dev_sizes,
                     dev_offsets, w_hh, dy, dh_n, dc_n, dxp, dhg, dh0, dc0):
        self._run(lib.PERSISTENT_BACKWARD, cell, xp, sizes[0], len(sizes), reverse,
                  sizes=dev_sizes, offsets=dev_offsets, hg_all=hg_all, y=y, h0=h0, c_all=c_all,
                  c0=c0, w_hh=w_hh, dy=dy, dh_n=dh_n, dc_n=dc_n, dxp=dxp, dhg=dhg, dh0=dh0,
                  dc0=dc0)


POINTWISE = PointwiseBackend()
PERSISTENT = PersistentBackend()
