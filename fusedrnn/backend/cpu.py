"""The ``cpu`` backend: fused C++ sequence kernels from ``fusedrnn._C`` (csrc/cpu).

Forward runs a whole layer direction in one op call and saves what the fused backward needs;
the weight gradients come out of a few large GEMMs after the backward time loop.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Backend

_DTYPES = (torch.float32, torch.float64)

try:
    import fusedrnn._C  # noqa: F401  (registers torch.ops.fusedrnn.*)
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # extension not built
    _IMPORT_ERROR = str(exc)


def _needs(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Sequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell_name, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, train):
        y, h_n, c_n, *saved = torch.ops.fusedrnn.sequence_forward(
            cell_name, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, train)
        ctx.cell_name, ctx.reverse = cell_name, reverse
        ctx.has = (c0 is not None, b_hh is not None, w_hr is not None)
        ctx.save_for_backward(batch_sizes, w_hh, w_hr, *saved)
        return y, h_n, (c_n if c0 is not None else None)

    @staticmethod
    def backward(ctx, grad_y, grad_hn, grad_cn):
        batch_sizes, w_hh, w_hr, *saved = ctx.saved_tensors
        has_c, has_b, has_proj = ctx.has
        if has_c and grad_cn is None:
            grad_cn = torch.zeros_like(saved[2][: int(batch_sizes[0])])
        dxp, dh0, dc0, dw_hh, db_hh, dw_hr = torch.ops.fusedrnn.sequence_backward(
            ctx.cell_name, batch_sizes, w_hh, w_hr, ctx.reverse, saved, grad_y.contiguous(),
            grad_hn.contiguous(), grad_cn.contiguous() if has_c else None)
        return (None, dxp, None, dh0, dc0 if has_c else None, dw_hh, db_hh if has_b else None,
                dw_hr if has_proj else None, None, None)


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self):
        if _IMPORT_ERROR is not None:
            return f"the C++ extension fusedrnn._C is not built ({_IMPORT_ERROR})"
        return None

    def unsupported_reason(self, device, dtype, cell, hidden_size, proj_size):
        if device.type != "cpu":
            return f"runs on CPU tensors only, not {device.type}"
        if dtype not in _DTYPES:
            return f"supports float32 and float64, not {dtype}"
        return None

    def sequence(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse):
        args = [t.contiguous() if t is not None else None for t in (xp, h0, c0, w_hh, b_hh, w_hr)]
        xp, h0, c0, w_hh, b_hh, w_hr = args
        train = _needs(*args)
        return _Sequence.apply(cell.name, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse,
                               train)


BACKEND = CpuBackend()
