"""What every kernel backend's autograd Functions share beyond the fused forward and backward.

A kernel's fused backward gives plain first derivatives fast. Everything else is derived from
the reference math (``reference.run_layer``) on the same inputs, so it is exact and composes
with every transform, at reference speed, and only when asked for:

- a backward that must itself be differentiable (``create_graph=True``: gradient penalties,
  ``gradgradcheck``, Hessian-vector products; ``torch.func.grad`` of ``grad``, ``hessian``) or
  that runs under a torch.func transform is the reference's vjp (``differentiable_vjp``);
- forward mode (``torch.func.jvp``, ``jacfwd``, ``forward_ad``) is the reference's jvp;
- ``torch.func.vmap`` runs the Function once per batch entry (``vmap_by_loop``).

Each kernel backend has two Functions over one backward: a plain one (``forward(ctx, ...)``),
the cheapest for autograd to call and the one torch.compile traces, and a transformable one
(``setup_context``, ``jvp``, ``vmap``) that torch.func requires; ``under_transform`` picks.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

_functorch = torch._C._functorch


def _tensor_slots(values: Sequence) -> list:
    return [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.is_floating_point()]


def under_transform() -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, ...) or an open forward-mode AD
    level: one check per call, whatever the tensors. Never while torch.compile traces (Dynamo
    does not trace torch.func)."""
    if torch.compiler.is_compiling():
        return False
    return forward_ad._current_level >= 0 or _functorch.maybe_current_level() is not None


def needs_differentiable_backward(grads: Sequence) -> bool:
    """A backward must be built from differentiable ops when grad mode is on inside it
    (``create_graph=True``, torch.func.grad), under a torch.func transform (``vmap`` of a vjp,
    as in ``jacrev``), or when autograd batches the incoming gradients itself
    (``is_grads_batched=True``, gradcheck's batched check: legacy batched tensors)."""
    if torch.is_grad_enabled():
        return True
    if torch.compiler.is_compiling():  # (Dynamo traces backwards too, and not these checks)
        return False
    return under_transform() or any(
        g is not None and _functorch.is_legacy_batchedtensor(g) for g in grads)


def _over_tensors(reference: Callable, inputs: Sequence):
    """``reference`` as a function of the floating-point tensors of ``inputs`` only, returning
    its non-None outputs; ``present`` records which of its outputs were not None."""
    slots = _tensor_slots(inputs)
    present: list = []

    def fn(*tensors):
        args = list(inputs)
        for i, t in zip(slots, tensors):
            args[i] = t
        outs = reference(*args)
        present[:] = [o is not None for o in outs]
        return tuple(o for o in outs if o is not None)

    return fn, slots, present


def differentiable_vjp(reference: Callable, inputs: Sequence, grad_outputs: Sequence) -> list:
    """The gradient of ``sum_k reference(*inputs)[k] * grad_outputs[k]`` with respect to every
    floating-point tensor in ``inputs`` (None for the other slots), through ``torch.func.vjp``,
    so that it is differentiable again and vmappable. ``grad_outputs`` has one entry per output
    of ``reference``; None stands for zeros (or for an output that is None)."""
    fn, slots, present = _over_tensors(reference, inputs)
    outs, pullback = torch.func.vjp(fn, *[inputs[i] for i in slots])
    given = [g for g, p in zip(grad_outputs, present) if p]
    grads = pullback(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, given)))
    result: list = [None] * len(inputs)
    for i, g in zip(slots, grads):
        result[i] = g
    return result


def reference_jvp(reference: Callable, inputs: Sequence, tangents: Sequence) -> tuple:
    """Forward-mode derivative of ``reference`` at ``inputs`` along ``tangents`` (one per input
    slot, None where an input has none), one per output of ``reference`` (None where the
    output is None)."""
    fn, slots, present = _over_tensors(reference, inputs)
    given = tuple(torch.zeros_like(inputs[i]) if tangents[i] is None else tangents[i]
                  for i in slots)
    _, out_tangents = torch.func.jvp(fn, tuple(inputs[i] for i in slots), given)
    out_tangents = list(out_tangents)
    return tuple(out_tangents.pop(0) if p else None for p in present)


def vmap_by_loop(apply: Callable, info, in_dims: Sequence[Optional[int]], args: Sequence):
    """A vmap rule: call ``apply`` once per entry of the vmapped dimension and stack the
    results (None outputs stay None). The kernels have no batch dimension of their own to
    fold a vmapped one into, and torch.nn's RNNs have no vmap rule at all."""
    outs = []
    for b in range(info.batch_size):
        outs.append(apply(*[a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]))
    stacked = tuple(None if o[0] is None else torch.stack(o) for o in zip(*outs))
    return stacked, tuple(None if o is None else 0 for o in stacked)


_TENSOR = object()  # marks a tensor slot in the inputs a transformable Function keeps


def plain_function(name: str, forward: Callable, save: Callable, backward: Callable):
    """A kernel backend's Function in the form autograd calls cheapest: ``forward`` takes ctx
    (no ``setup_context``, whose ``apply`` binds arguments through ``inspect`` at every call).
    Arguments as for ``transformable_function``; torch.func needs that one."""

    def forward_with_ctx(ctx, *inputs):
        outputs = forward(*inputs)
        save(ctx, inputs, outputs)
        return outputs[:3]

    return type(name, (torch.autograd.Function,), dict(
        __doc__=plain_function.__doc__, forward=staticmethod(forward_with_ctx),
        backward=staticmethod(backward)))


def transformable_function(name: str, forward: Callable, save: Callable, backward: Callable,
                           reference: Callable):
    """A kernel backend's Function in the form torch.func accepts (``setup_context``), with a
    ``vmap`` rule and forward-mode derivatives from ``reference``.

    ``forward(*inputs) -> (y, h_n, c_n, *saved)``: what the fused backward reads must be an
    output to reach ``setup_context`` (it is marked not differentiable). ``save(ctx, inputs,
    outputs)`` stores what ``backward`` (the backend's, shared with its plain Function)
    reads; ``reference(*inputs) -> (y, h_n, c_n)`` is the same layer in torch ops.
    """

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[3:])
        ctx.set_materialize_grads(False)  # no zeros for the saved activations' gradients
        save(ctx, inputs, output)
        ctx.outputs = len(output)
        ctx.template = [_TENSOR if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_forward(*[a for a in inputs if isinstance(a, Tensor)])

    def jvp(ctx, *tangents):
        tensors = iter(ctx.saved_tensors)
        inputs = [next(tensors) if a is _TENSOR else a for a in ctx.template]
        return (*reference_jvp(reference, inputs, tangents), *[None] * (ctx.outputs - 3))

    def vmap(info, in_dims, *args):
        return vmap_by_loop(function.apply, info, in_dims, args)

    function = type(name, (torch.autograd.Function,), dict(
        __doc__=transformable_function.__doc__, forward=staticmethod(forward),
        setup_context=staticmethod(setup_context), backward=staticmethod(backward),
        jvp=staticmethod(jvp), vmap=staticmethod(vmap)))
    return function
