"""Cells that are not shipped, added through the registry alone: the proof that a new cell is
its math plus its traits, and touches no backend or kernel file.

- A coupled-gate cell (a GRU without the reset gate: two gates, reads h_prev), with its math
  in torch and in Triton, runs on the reference and on both Triton paths (interpreter), and
  is checked against a plain torch loop written here, gradients included. The C++ kernels do
  not have it, so ``cpu`` says so and ``auto`` falls back to the reference.
- A leaky cell with an extra per-cell parameter (``h' = (1 - a) h + a tanh(xg + hg)``, a
  learned rate ``a`` per unit) runs on the reference, which passes extras to the cell's step;
  the kernel backends refuse extras, and ``auto`` falls back.
"""
import os

import pytest
import torch

import fusedrnn
from fusedrnn import cells, dispatch
from fusedrnn.backend.base import LayerArgs, LayerSpec
from fusedrnn.functional import rnn_layer
from conftest import assert_close
from sequence_check import random_batch_sizes

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


def coupled_step(xg, hg, h, c):
    xz, xn = xg.chunk(2, dim=-1)
    hz, hn = hg.chunk(2, dim=-1)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + hn)
    return n + z * (h - n), None


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def coupled_fwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c):
    z = _sigmoid(x0 + g0)
    n = 2.0 * _sigmoid(2.0 * (x1 + g1)) - 1.0
    return n + z * (h - n), c


@triton.jit
def coupled_bwd(x0, x1, x2, x3, g0, g1, g2, g3, h, c, dh, dc):
    z = _sigmoid(x0 + g0)
    n = 2.0 * _sigmoid(2.0 * (x1 + g1)) - 1.0
    d_z = dh * (h - n) * z * (1.0 - z)
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    zero = tl.zeros_like(dh)
    return d_z, d_n, zero, zero, d_z, d_n, zero, zero, dh * z, dc


COUPLED = cells.Cell("toy_coupled", gates=2, states=1, reads_h=True, split_hidden_grad=False,
                     saved_per_h=0, step=coupled_step,
                     triton_math=lambda: (coupled_fwd, coupled_bwd))


def leaky_step(xg, hg, h, c, leak):
    return (1 - leak) * h + leak * torch.tanh(xg + hg), None


LEAKY = cells.Cell("toy_leaky", gates=1, states=1, reads_h=True, split_hidden_grad=False,
                   saved_per_h=0, step=leaky_step, extra_params=("leak",))


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    for cell in (COUPLED, LEAKY):
        monkeypatch.delitem(cells.CELLS, cell.name, raising=False)
        cells.register(cell)
    monkeypatch.setattr(dispatch, "_chosen", {})
    yield
    for cell in (COUPLED, LEAKY):
        cells.CELLS.pop(cell.name)


def plain_loop(step, x, lengths, h0, w_ih, w_hh, b_ih, b_hh, **extras):
    """The cell run one sequence at a time, padded steps skipped: an independent oracle."""
    outs, finals = [], []
    for b, length in enumerate(lengths):
        h = h0[b:b + 1]
        seq = []
        for t in range(length):
            xg = x[t, b:b + 1] @ w_ih.t() + b_ih
            h, _ = step(xg, h @ w_hh.t() + b_hh, h, None, **extras)
            seq.append(h)
        outs.append(torch.cat(seq))
        finals.append(h)
    return outs, torch.cat(finals)


def _to_rows(outs, lengths):
    """Per-sequence outputs as time-major packed rows (lengths sorted descending)."""
    return torch.cat([torch.stack([outs[b][t] for b in range(len(lengths)) if lengths[b] > t])
                      for t in range(max(lengths))])


def _available(name):
    ok = fusedrnn.backends()[name] == "available"
    return ok and (not name.startswith("triton") or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("backend", [pytest.param(n, marks=pytest.mark.skipif(
    not _available(n), reason=f"{n} unavailable"))
    for n in ("reference", "triton:alternating", "triton:persistent")])
def test_coupled_cell_matches_a_plain_loop(rng, backend):
    steps, batch, inputs, hidden = 5, 6, 3, 7
    batch_sizes = random_batch_sizes(rng, steps, batch, packed=True)
    lengths = [int((batch_sizes > b).sum()) for b in range(batch)]
    leaf = lambda *shape: (0.5 * torch.randn(*shape)).requires_grad_()  # noqa: E731
    x, h0 = leaf(steps, batch, inputs), leaf(batch, hidden)
    w_ih, w_hh, b_ih, b_hh = leaf(2 * hidden, inputs), leaf(2 * hidden, hidden), \
        leaf(2 * hidden), leaf(2 * hidden)
    params = [x, h0, w_ih, w_hh, b_ih, b_hh]
    outs, h_n = plain_loop(coupled_step, x, lengths, h0, w_ih, w_hh, b_ih, b_hh)
    expected = [_to_rows(outs, lengths), h_n]
    rows = _to_rows([x[:n, b] for b, n in enumerate(lengths)], lengths)
    args = LayerArgs(COUPLED, batch_sizes, h0, None, w_ih, w_hh, b_ih, b_hh, None, reverse=False)
    got = rnn_layer(rows, args, backend)[:2]
    up = [torch.randn_like(t) for t in expected]
    grads = [torch.autograd.grad(sum((a * u).sum() for a, u in zip(outs_, up)), params)
             for outs_ in (got, expected)]
    for a, b in zip(list(got) + list(grads[0]), expected + list(grads[1])):
        assert_close(a, b, torch.float32)


def test_a_cell_without_cpp_math_falls_back():
    spec = LayerArgs(COUPLED, torch.tensor([1]), torch.zeros(1, 2), None, torch.zeros(4, 3),
                     torch.zeros(4, 2), None, None, None, False).spec(torch.zeros(1, 3))
    assert "no cell 'toy_coupled'" in dispatch.reason("cpu", spec)
    assert dispatch.select("auto", spec).name == "reference"


def test_an_extra_parameter_reaches_the_cell_on_the_reference(rng):
    steps, batch, inputs, hidden = 4, 3, 2, 5
    leaf = lambda *shape: (0.5 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()  # noqa: E731
    x, h0 = leaf(steps, batch, inputs), leaf(batch, hidden)
    w_ih, w_hh, b_ih, b_hh = leaf(hidden, inputs), leaf(hidden, hidden), leaf(hidden), leaf(hidden)
    leak = torch.rand(hidden, dtype=torch.float64).requires_grad_()
    lengths = [steps] * batch
    outs, h_n = plain_loop(leaky_step, x, lengths, h0, w_ih, w_hh, b_ih, b_hh, leak=leak)
    args = LayerArgs(LEAKY, torch.full((steps,), batch), h0, None, w_ih, w_hh, b_ih, b_hh, None,
                     reverse=False, extras={"leak": leak})
    y, h, _ = rnn_layer(x.reshape(-1, inputs), args, "auto")
    assert_close(y, _to_rows(outs, lengths), torch.float64)
    assert_close(h, h_n, torch.float64)
    (g,) = torch.autograd.grad(y.sum(), leak)
    (g_ref,) = torch.autograd.grad(_to_rows(outs, lengths).sum(), leak)
    assert_close(g, g_ref, torch.float64)
    # the kernel backends refuse extras (shown on a cell whose math they have)
    spec = LayerSpec(torch.device("cpu"), torch.float32, cells.CELLS["rnn_tanh"], hidden,
                     extras=frozenset({"leak"}))
    for name in ("cpu", "triton:alternating", "triton:persistent"):
        if _available(name):
            assert "extra parameters" in dispatch.reason(name, spec), name
    assert dispatch.select("auto", spec).name == "reference"
