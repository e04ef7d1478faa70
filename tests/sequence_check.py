"""Checks one backend's ``sequence`` against the reference backend on fresh random inputs.

Every kernel backend's tests call ``check_sequence``: outputs, final states and the gradient
of every differentiable argument must agree with the reference's autograd.
"""
import random

import torch

from conftest import assert_close, tolerances
from fusedrnn.backend.base import LayerArgs
from fusedrnn.backend.reference import BACKEND as REFERENCE
from fusedrnn.cells import CELLS


def random_batch_sizes(rng: random.Random, steps: int, batch: int, packed: bool) -> torch.Tensor:
    """Per-step active-row counts: constant for padded input, from random lengths when packed."""
    if not packed:
        return torch.full((steps,), batch, dtype=torch.int64)
    lengths = sorted([steps] + [rng.randint(1, steps) for _ in range(batch - 1)], reverse=True)
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(steps)], dtype=torch.int64)


def sequence_inputs(cell, batch_sizes, hidden, proj=0, bias=True, dtype=torch.float64,
                    device="cpu", scale=0.5):
    """Random arguments for ``Backend.sequence`` (leaf tensors that require grad)."""
    rows, batch = int(batch_sizes.sum()), int(batch_sizes[0])
    out = proj or hidden
    g = cell.gates * hidden

    def leaf(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device) \
            .requires_grad_()

    return dict(
        xp=leaf(rows, g), batch_sizes=batch_sizes, h0=leaf(batch, out),
        c0=leaf(batch, hidden) if cell.has_cell_state else None,
        w_hh=leaf(g, out), b_hh=leaf(g) if bias else None,
        w_hr=leaf(out, hidden) if proj else None)


def run_sequence(backend, cell, args, reverse):
    """``backend.sequence`` on the arguments ``sequence_inputs`` drew."""
    layer = LayerArgs(cell, args["batch_sizes"], args["h0"], args["c0"], None, args["w_hh"], None,
                      args["b_hh"], args["w_hr"], reverse)
    return backend.sequence(args["xp"], layer)


def _run(backend, cell, args, reverse, grads):
    y, h, c = run_sequence(backend, cell, args, reverse)
    outs = [y, h] + ([c] if c is not None else [])
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    # through the transposes, the gradient reaching each output is a non-contiguous view, as
    # it is when a caller transposes h_n: kernels must not assume row-major incoming gradients
    loss = sum((o.t() * g.t().contiguous()).sum() for o, g in zip(outs, grads))
    return outs, torch.autograd.grad(loss, leaves, allow_unused=True)


def check_sequence(backend, cell_name, batch_sizes, hidden, proj=0, bias=True, reverse=False,
                   dtype=torch.float64, device="cpu", ref_dtype=torch.float64, tol_dtype=None,
                   scale=0.5, tol=None, check_grads=True):
    """Compare ``backend.sequence`` with the reference (computed in ``ref_dtype``).

    Tolerances are ``tolerances(tol_dtype or dtype)`` per element, unless ``tol=(rtol, atol)``
    is given: then each tensor is compared normwise, ``max|a - b| <= atol + rtol * max|b|``,
    which suits fp16/bf16, where sums over many rows (weight gradients) cancel and an
    elementwise check flags small entries. In float32 against a float64 reference, an element
    may also be off by up to twice the error of the reference's own float32 run on the same
    inputs at that element: a bias gradient, a float32 sum over every row that cancels to near
    zero, can miss 1e-5 in torch's float32 too (seen: one entry at 1.08x the tolerance here,
    1.21x in torch's float32 at the same entry, one draw in a few hundred).
    ``scale`` is the inputs' standard deviation. ``check_grads=False`` compares only the
    outputs.
    """
    cell = CELLS[cell_name]
    args = sequence_inputs(cell, batch_sizes, hidden, proj, bias, dtype, device, scale)
    ref_args = {k: (v.detach().to("cpu", ref_dtype).requires_grad_() if isinstance(v, torch.Tensor)
                    and v.is_floating_point() else v) for k, v in args.items()}
    with torch.no_grad():
        shapes = run_sequence(REFERENCE, cell, ref_args, reverse)
    upstream = [torch.randn_like(t) for t in shapes if t is not None]
    ref_outs, ref_grads = _run(REFERENCE, cell, ref_args, reverse, upstream)
    outs, grads = _run(backend, cell, args, reverse, [u.to(device, dtype) for u in upstream])
    tol_dtype = tol_dtype or dtype
    f32_outs, f32_grads = [None] * 3, [None] * len(ref_grads)
    if tol is None and dtype == torch.float32 and ref_dtype == torch.float64:
        f32_args = {k: (v.detach().to("cpu").requires_grad_() if isinstance(v, torch.Tensor)
                        and v.is_floating_point() else v) for k, v in args.items()}
        f32_outs, f32_grads = _run(REFERENCE, cell, f32_args, reverse,
                                   [u.to(torch.float32) for u in upstream])

    def check(a, b, what, b32=None):
        if tol is None and b32 is not None:
            assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)}, want {tuple(b.shape)}"
            rtol, atol = tolerances(tol_dtype)
            allowed = torch.maximum(atol + rtol * b.abs(), 2 * (b32.double() - b).abs())
            excess = ((a - b).abs() / allowed).max().item()
            assert excess <= 1, (f"{what}: {excess:.3g}x the allowed error (per element: "
                                 f"{rtol:g} relative plus {atol:g}, or twice float32's own)")
            return None
        if tol is None:
            return assert_close(a, b, tol_dtype, what)
        err, bound = (a - b).abs().max().item(), tol[1] + tol[0] * b.abs().max().item()
        assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g} (normwise {tol})"

    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    for name, a, b, b32 in zip(["y", "h_n", "c_n"], outs, ref_outs, f32_outs):
        check(a.to("cpu", ref_dtype), b, f"{cell_name} {name}", b32)
    for name, a, b, b32 in zip(names, grads if check_grads else [], ref_grads, f32_grads):
        assert a is not None, f"{cell_name}: no gradient for {name}"
        check(a.to("cpu", ref_dtype), b, f"{cell_name} grad {name}", b32)


def gradcheck_sequence(backend, rng: random.Random, cell_name, reverse, proj=True,
                       fast_mode=False):
    """torch.autograd.gradcheck of ``backend.sequence`` in float64 on a small packed batch
    (an LSTM with a projection unless ``proj`` is False). ``fast_mode`` checks the Jacobian
    along random directions, for backends whose calls are slow (the emulated CUDA kernels)."""
    cell = CELLS[cell_name]
    batch_sizes = random_batch_sizes(rng, 4, 3, packed=True)
    args = sequence_inputs(cell, batch_sizes, hidden=3,
                           proj=2 if cell_name == "lstm" and proj else 0)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        kw = dict(args, **dict(zip(names, tensors)))
        return tuple(t for t in run_sequence(backend, cell, kw, reverse) if t is not None)

    return torch.autograd.gradcheck(fn, [args[n] for n in names], fast_mode=fast_mode)
