"""The ``cpu`` backend: fused C++ sequence kernels from ``fusedrnn._C`` (csrc/cpu).

Forward runs a whole layer direction in one op call and saves what the fused backward needs.
``layer`` also owns the input projection: it is a bias-free GEMM (the pointwise pass adds
``b_ih``, saving addmm's bias copy), and the backward returns both bias gradients as column
sums taken inside the pointwise pass, so no separate reduction runs over the gradients.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, Optional, Tuple

import torch

from ..cells import CELLS, built_cell_reason
from .base import Backend
from .reference import run_layer
from .transforms import (differentiable_vjp, needs_differentiable_backward, plain_function,
                         transformable_function, under_transform)

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

try:
    import fusedrnn._C  # noqa: F401  (registers torch.ops.fusedrnn.*)
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # extension not built
    _IMPORT_ERROR = str(exc)


def _forward(cell_name, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train):
    """x -> (y, h_n, c_n, *saved); ``train`` False skips every store backward would need.

    bfloat16: the input projection is a bf16 GEMM with a float32 result; the kernels get
    everything else widened to float32 but ``w_hh``, whose bf16 tells them to run the step GEMMs
    on bf16 operands with fp32 accumulation (csrc/cpu/sequence.cpp, PanelGemm). States, gates
    and what backward reads stay float32; the outputs are rounded to bf16."""
    if x.dtype == torch.bfloat16:
        xp = x.float() if w_ih is None else torch.ops.fusedrnn.mm_rows(x, w_ih.t())
        h0, c0, b_ih, b_hh, w_hr = _widened(h0, c0, b_ih, b_hh, w_hr)
        y, h_n, c_n, *saved = torch.ops.fusedrnn.sequence_forward(
            cell_name, xp, batch_sizes, h0, c0, w_hh, b_ih, b_hh, w_hr, reverse, train)
        return (y.bfloat16(), h_n.bfloat16(), c_n.bfloat16(), *saved)
    xp = x if w_ih is None else torch.ops.fusedrnn.mm_rows(x, w_ih.t())
    return torch.ops.fusedrnn.sequence_forward(cell_name, xp, batch_sizes, h0, c0, w_hh, b_ih,
                                               b_hh, w_hr, reverse, train)


def _widened(*tensors):
    """The tensors in float32 (None stays None): a bfloat16 module's operands for the kernels."""
    return [None if t is None else t.float() for t in tensors]


def _reference(cell_name, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The same layer in the reference's torch ops: the source of every derivative the fused
    backward does not give (backend/transforms.py)."""
    return run_layer(CELLS[cell_name], x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                     reverse)


def _save(ctx, inputs, outputs):
    ctx.cell_name, ctx.reverse = inputs[0], inputs[-1]
    ctx.save_for_backward(*inputs[1:-1], *outputs[3:])


def _backward(ctx, grad_y, grad_hn, grad_cn, *_):
    """The fused backward; the reference's vjp when the backward must itself be differentiable
    or runs under torch.func (backend/transforms.py)."""
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *saved = ctx.saved_tensors
    has_c = c0 is not None
    if needs_differentiable_backward((grad_y, grad_hn, grad_cn)):
        inputs = (ctx.cell_name, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                  ctx.reverse)
        return tuple(differentiable_vjp(_reference, inputs, (grad_y, grad_hn, grad_cn)))
    # bfloat16: the states' gradients run in float32; the GEMMs take bf16 operands (x, w_ih and
    # w_hh stay bf16, as in _forward); the results are rounded to bf16
    low = x.dtype == torch.bfloat16
    if low:
        h0, c0, w_hr, grad_y, grad_hn, grad_cn = _widened(h0, c0, w_hr, grad_y, grad_hn, grad_cn)
    grad_y = h0.new_zeros(x.shape[0], h0.shape[1]) if grad_y is None else grad_y.contiguous()
    grad_hn = torch.zeros_like(h0) if grad_hn is None else grad_hn.contiguous()
    if has_c:
        grad_cn = torch.zeros_like(c0) if grad_cn is None else grad_cn.contiguous()
    dxp, dh0, dc0, dw_hh, db_hh, dw_hr, db_ih = torch.ops.fusedrnn.sequence_backward(
        ctx.cell_name, batch_sizes, w_hh, w_hr, ctx.reverse, saved, grad_y, grad_hn,
        grad_cn if has_c else None)
    need = ctx.needs_input_grad
    if w_ih is None:
        dx, dw_ih = dxp, None
    else:
        if low:
            dxp = dxp.bfloat16()
            dx = torch.mm(dxp, w_ih) if need[1] else None
            dw_ih = torch.mm(dxp.t(), x) if need[5] else None
        else:
            dx = torch.ops.fusedrnn.mm_rows(dxp, w_ih) if need[1] else None
            dw_ih = torch.ops.fusedrnn.mm_tn(dxp, x) if need[5] else None
    grads = (None, dx, None, dh0, dc0 if has_c else None, dw_ih, dw_hh,
             db_ih if need[7] else None, db_hh if need[8] else None,
             dw_hr if w_hr is not None else None, None)
    return tuple(None if g is None else g.bfloat16() for g in grads) if low else grads


def _forward_saving(cell_name, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """(y, h_n, c_n, *saved): the training forward, c_n None for a cell without one."""
    y, h_n, c_n, *saved = _forward(cell_name, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                   w_hr, reverse, True)
    return (y, h_n, c_n if c0 is not None else None, *saved)


# (cell_name, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse) -> (y, h_n, c_n);
# with ``w_ih`` None, x is already the projection xp (``sequence``).
_Layer = plain_function("_Layer", _forward_saving, _save, _backward)
_TransformableLayer = transformable_function("_TransformableLayer", _forward_saving, _save,
                                             _backward, _reference)


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _run(cell_name, *args):
    """Autograd only when a gradient can flow (``_TransformableLayer`` under torch.func):
    inference (no_grad, or nothing requiring grad) calls the op directly, with no saves and
    no autograd node."""
    tensors = args[:-1]
    if under_transform():
        return _TransformableLayer.apply(cell_name, *args)[:3]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _Layer.apply(cell_name, *args)
    y, h_n, c_n = _forward(cell_name, *args, False)[:3]
    return y, h_n, (c_n if args[3] is not None else None)


def _stack_forward(*args):
    """torch.ops.fusedrnn.stack_forward (one name for tests to watch)."""
    return torch.ops.fusedrnn.stack_forward(*args)


def _stack_inputs(count, tensors):
    """``(h0s, c0s, weights)`` from ``_reference_stack``'s flat tensor arguments (flat, so that
    torch.func differentiates each): ``count`` h0, ``count`` c0 (None for a cell without c),
    then five weights per layer and direction."""
    return list(tensors[:count]), list(tensors[count:2 * count]), list(tensors[2 * count:])


def _dropout_masks(p, rows, width, layers, like):
    """The dropout masks between ``layers`` layers of ``[rows, width]`` outputs, each scaled by
    1 / (1 - p), drawn as F.dropout draws them (same generator calls, same values)."""
    if p >= 1:
        return [like.new_zeros(rows, width) for _ in range(layers - 1)]
    return [like.new_empty(rows, width).bernoulli_(1 - p).div_(1 - p) for _ in range(layers - 1)]


def _reference_stack(cell_name, bidirectional, count, masks, x, batch_sizes, *tensors):
    """The whole stack in the reference's torch ops: what a differentiable backward derives."""
    h0s, c0s, weights = _stack_inputs(count, tensors)
    directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    for layer in range(count // directions):
        if layer > 0 and masks:
            x = x * masks[layer - 1]
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            y, h, c = _reference(cell_name, x, batch_sizes, h0s[k], c0s[k],
                                 *weights[5 * k:5 * k + 5], direction == 1)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, 1)
    return x, torch.stack(h_n), (torch.stack(c_n) if c0s[0] is not None else None)


def _stack_train(*args):
    """torch.ops.fusedrnn.stack_train: the training stack, its autograd node in C++
    (csrc/cpu/stack_autograd.cpp); one name for tests to watch."""
    return torch.ops.fusedrnn.stack_train(*args)


def _stack_backward_reference(cell_name, bidirectional, masks, x, batch_sizes, h0s, c0s,
                              weights, grad_y, grad_hn, grad_cn):
    """stack_train's backward where it must be differentiable (create_graph, batched grads):
    the vjp of ``_reference_stack``, one gradient per x, h0s, c0s and weights, an empty
    tensor where there is none."""
    count = len(h0s)
    inputs = (cell_name, bidirectional, count, masks, x, batch_sizes, *h0s, *c0s, *weights)
    grads = differentiable_vjp(_reference_stack, inputs, (grad_y, grad_hn, grad_cn))
    return [x.new_empty(0) if g is None else g for g in [grads[4], *grads[6:]]]


def release_cached_buffers() -> int:
    """Hands the idle blocks of the extension's buffer cache back to the system, as
    ``torch.cuda.empty_cache`` does on a GPU; returns the bytes released. Layer calls keep their
    large buffers (outputs, saved activations, gradients) cached so that the next call does not
    page-fault them in again; ``FUSEDRNN_CPU_CACHE_MB`` caps the idle megabytes kept (default 1024)."""
    if _IMPORT_ERROR is not None:
        return 0
    return int(torch.ops.fusedrnn.release_cached_buffers())


def _register_fake_kernels():
    """Shape-only versions of the C++ ops, so that torch.compile can trace a whole model through
    them (``fullgraph=True``) instead of breaking the graph at each layer."""

    @torch.library.register_fake("fusedrnn::mm_rows")
    def _mm_rows(a, b):  # (bf16 operands: a float32 result)
        return a.new_empty(a.shape[0], b.shape[1],
                           dtype=torch.float32 if a.dtype == torch.bfloat16 else a.dtype)

    @torch.library.register_fake("fusedrnn::mm_tn")
    def _mm_tn(a, b):
        return a.new_empty(a.shape[1], b.shape[1])

    @torch.library.register_fake("fusedrnn::sequence_forward")
    def _sequence_forward(cell, xp, batch_sizes, h0, c0, w_hh, b_ih, b_hh, w_hr, reverse, train):
        rows, (B, h_out) = xp.shape[0], h0.shape
        H = w_hh.shape[0] // CELLS[cell].gates
        lstm = CELLS[cell].has_cell_state
        saved = ([xp.new_empty(rows, CELLS[cell].saved_per_h * H), xp.new_empty(rows, h_out),
                  xp.new_empty(rows if lstm else 0, H),
                  xp.new_empty(rows if w_hr is not None else 0, H)]
                 if train else [xp.new_empty(0) for _ in range(4)])
        return [xp.new_empty(rows, h_out), h0.new_empty(B, h_out),
                h0.new_empty(B, H) if lstm else xp.new_empty(0), *saved]

    @torch.library.register_fake("fusedrnn::stack_forward")
    def _stack_forward_fake(cell, x, batch_sizes, h0, c0, weights, bidirectional, train,
                            masks):
        (B, h_out), H = h0[0].shape, weights[1].shape[0] // CELLS[cell].gates
        directions, rows = 2 if bidirectional else 1, x.shape[0]
        saved = []
        if train:
            for k in range(len(h0)):
                saved += _sequence_forward(cell, x.new_empty(rows, weights[5 * k + 1].shape[0]),
                                           batch_sizes, h0[k], c0[k], weights[5 * k + 1], None,
                                           None, weights[5 * k + 4], False, True)[3:]
            saved += [x.new_empty(rows, directions * h_out)
                      for _ in range(len(h0) // directions - 1)]
        return [x.new_empty(rows, directions * h_out), h0[0].new_empty(len(h0), B, h_out),
                h0[0].new_empty(len(h0), B, H) if CELLS[cell].has_cell_state
                else x.new_empty(0), *saved]

    @torch.library.register_fake("fusedrnn::stack_train")
    def _stack_train_fake(cell, x, batch_sizes, h0, c0, weights, bidirectional, masks):
        return _stack_forward_fake(cell, x, batch_sizes, h0, c0, weights, bidirectional, False,
                                   masks)[:3]

    @torch.library.register_fake("fusedrnn::stack_backward")
    def _stack_backward_fake(cell, batch_sizes, x, weights, bidirectional, saved, grad_y,
                             grad_hn, grad_cn, need_dx, masks):
        count, (_, B, h_out) = len(weights) // 5, grad_hn.shape
        H = weights[1].shape[0] // CELLS[cell].gates
        grads = [x.new_empty(0) if w is None else torch.empty_like(w) for w in weights]
        return [torch.empty_like(x) if need_dx else x.new_empty(0),
                x.new_empty(count, B, h_out),
                x.new_empty(count, B, H) if CELLS[cell].has_cell_state else x.new_empty(0),
                *grads]

    @torch.library.register_fake("fusedrnn::sequence_backward")
    def _sequence_backward(cell, batch_sizes, w_hh, w_hr, reverse, saved, grad_y, grad_hn,
                           grad_cn):
        gh, h_out = w_hh.shape
        act = saved[0]  # the gradients' dtype (float32 also for a bfloat16 module's bf16 w_hh)
        return [act.new_empty(act.shape[0], gh), torch.empty_like(grad_hn),
                torch.empty_like(grad_cn) if CELLS[cell].has_cell_state else act.new_empty(0),
                act.new_empty(gh, h_out), act.new_empty(gh),
                w_hr.new_empty(w_hr.shape) if w_hr is not None else act.new_empty(0),
                act.new_empty(gh)]


if _IMPORT_ERROR is None:
    _register_fake_kernels()
    # ("Batched": autograd's own batched gradients, which would otherwise take the legacy
    # vmap fallback, which has no rule for a list-returning op; the function runs on them)
    for key in ("CompositeImplicitAutograd", "Batched"):
        torch.library.impl("fusedrnn::stack_backward_reference", key)(_stack_backward_reference)


def _built_cells() -> Dict[str, Tuple[int, ...]]:
    """Each cell the C++ kernels were built with (csrc/cells/cells.h) and its traits as built.
    Read once, at import: no op may run while torch.export traces a forward (it would record
    the call, and cannot hold its list of names)."""
    return {name: tuple(torch.ops.fusedrnn.cell_traits(name))
            for name in torch.ops.fusedrnn.cell_names()}


_BUILT_CELLS = _built_cells() if _IMPORT_ERROR is None else {}


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self):
        if _IMPORT_ERROR is not None:
            return f"the C++ extension fusedrnn._C is not built ({_IMPORT_ERROR})"
        return None

    def unsupported_reason(self, spec):
        if spec.device.type != "cpu":
            return f"runs on CPU tensors only, not {spec.device.type}"
        if spec.dtype not in _DTYPES:
            return f"supports float32, float64 and bfloat16, not {spec.dtype}"
        return (built_cell_reason(spec.cell, _BUILT_CELLS.get(spec.cell.name), "C++")
                or super().unsupported_reason(spec))

    def sequence(self, xp, args):
        xp, h0, c0, w_hh, b_hh, w_hr = _contiguous(xp, args.h0, args.c0, args.w_hh, args.b_hh,
                                                   args.w_hr)
        return _run(args.cell.name, xp, args.batch_sizes, h0, c0, None, w_hh, None, b_hh, w_hr,
                    args.reverse)

    def layer(self, x, args):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _contiguous(
            x, args.h0, args.c0, args.w_ih, args.w_hh, args.b_ih, args.b_hh, args.w_hr)
        return _run(args.cell.name, x, args.batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                    args.reverse)

    def stack(self, x, stack, dropout=0.0):
        """The whole stack in one op call, ``stack_forward``, which runs the same C++ as ``layer``
        without the Python between the layers (on a 2-layer LSTM of 64 units that was ~0.1 ms
        of a 1.3 ms forward); in training ``stack_train``, the same with its autograd node in
        C++ (a Python autograd.Function cost ~0.1 ms per step on a batch-1 LSTM). Dropout
        between the layers runs inside the call, on masks drawn here as F.dropout draws them.
        bfloat16 in training and anything under torch.func run layer by layer."""
        if under_transform():
            return super().stack(x, stack, dropout)
        h0s, c0s, weights = (_contiguous(*stack.h0s), _contiguous(*stack.c0s),
                             _contiguous(*stack.weights))
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in [x, *h0s, *c0s, *weights])
        if x.dtype == torch.bfloat16 and needs_grad:
            return super().stack(x, stack, dropout)
        directions = 2 if stack.bidirectional else 1
        x = x.contiguous()
        masks = _dropout_masks(dropout, x.shape[0], directions * h0s[0].shape[1],
                               len(h0s) // directions, x) if dropout else []
        if needs_grad:
            y, h_n, c_n = _stack_train(stack.cell.name, x, stack.batch_sizes, h0s, c0s, weights,
                                       stack.bidirectional, masks)
        else:
            y, h_n, c_n = _stack_forward(stack.cell.name, x, stack.batch_sizes, h0s, c0s,
                                         weights, stack.bidirectional, False, masks)
        return y, h_n, (c_n if c0s[0] is not None else None)


BACKEND = CpuBackend()


# The CPU flags that decide which kernels and GEMM routes a machine can run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpu_model_and_flags() -> Tuple[str, Tuple[str, ...]]:
    """The CPU's model name and which of ISA_FLAGS it has (from /proc/cpuinfo, as lscpu)."""
    model, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == platform.machine():
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def cpu_info() -> Dict[str, object]:
    """What the ``cpu`` backend runs on here and how: the CPU model and ISA, the BLAS, the
    forward GEMM route setting (``FUSEDRNN_CPU_GEMM``: ``mkl``, ``onednn``, ``avx512`` or
    ``auto``), whether the oneDNN tiles (float32, and bf16 operands for a bfloat16 module) and our
    AVX-512 micro-kernel (the float32 forward) can run, how the float32
    pointwise pass runs (``avx512`` or ``compiler-vectorized``, ``FUSEDRNN_CPU_AVX512=0``) and the
    routes measured so far in this process, one line per layer shape."""
    model, flags = _cpu_model_and_flags()
    info: Dict[str, object] = {"cpu": model, "isa": " ".join(flags) or "unknown",
                               "threads": torch.get_num_threads(),
                               "mkl": torch.backends.mkl.is_available(),
                               "gemm_route": os.environ.get("FUSEDRNN_CPU_GEMM") or "auto"}
    if _IMPORT_ERROR is not None:
        info["unavailable"] = BACKEND.unavailable_reason()
        return info
    for key, reason in (("onednn_route", torch.ops.fusedrnn.onednn_route_reason()),
                        ("bf16_route", torch.ops.fusedrnn.bf16_route_reason()),
                        ("avx512_route", torch.ops.fusedrnn.avx512_route_reason())):
        info[key] = "available" if not reason else f"unavailable: {reason}"
    info["pointwise"] = torch.ops.fusedrnn.pointwise_isa()
    info["measured_routes"] = list(torch.ops.fusedrnn.gemm_routes())
    return info
