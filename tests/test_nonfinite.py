"""NaN and Inf go where torch.nn sends them, on every backend, in outputs and in gradients.

``torch.testing.assert_close(..., equal_nan=True)`` compares by position: a NaN must meet a
NaN and an infinity the same infinity; the finite values are compared at the dtype's
tolerance. Each case puts one non-finite value into the input or the initial state.
"""

import pytest
import torch
import torch.nn as nn

import fusedrnn
from conftest import runs_on_cpu_tensors, tolerances

CELLS = {"lstm": (nn.LSTM, fusedrnn.LSTM, {}), "gru": (nn.GRU, fusedrnn.GRU, {}),
         "rnn_tanh": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "tanh"}),
         "rnn_relu": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"})}




# (backend, dtype): the C++ kernels in both of their dtypes, the Triton ones in fp32.
BACKENDS = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}",
                         marks=pytest.mark.skipif(not runs_on_cpu_tensors(name),
                                                  reason=f"{name} unavailable"))
            for name, dtype in [("reference", torch.float64), ("cpu", torch.float64),
                                ("cpu", torch.float32), ("triton:persistent", torch.float32),
                                ("triton:alternating", torch.float32),
                                ("cuda:persistent", torch.float64),
                                ("cuda:pointwise", torch.float64)]]
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _close(actual, expected, dtype, what):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _outputs_and_grads(module, x, hx, upstream_seed):
    x = x.clone().requires_grad_()
    hx = None if hx is None else hx.clone().requires_grad_()
    if isinstance(module, nn.LSTM) and hx is not None:
        states = (hx, torch.zeros_like(hx))
    else:
        states = hx
    out, hidden = module(x, states)
    outs = [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    gen = torch.Generator().manual_seed(upstream_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    leaves = [x] + ([hx] if hx is not None else []) + list(module.parameters())
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("where", ["input", "state"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_nonfinite_like_torch_nn(rng, backend, dtype, cell, value, where):
    torch_cls, fused_cls, kw = CELLS[cell]
    ref = torch_cls(3, 5, num_layers=2, bidirectional=True, **kw).to(dtype)
    fused = fused_cls(3, 5, num_layers=2, bidirectional=True, backend=backend, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    steps, batch = 4, 3
    x = torch.randn(steps, batch, 3, dtype=dtype)
    hx = torch.randn(4, batch, 5, dtype=dtype) if where == "state" else None
    target = x if where == "input" else hx
    index = tuple(rng.randrange(n) for n in target.shape)
    target[index] = VALUES[value]
    seed = rng.randrange(2**31)
    ref_outs, ref_grads = _outputs_and_grads(ref, x, hx, seed)
    outs, grads = _outputs_and_grads(fused, x, hx, seed)
    assert any(not t.isfinite().all() for t in ref_outs + list(ref_grads)) or value != "nan"
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        _close(a, b, dtype, f"output {i}")
    names = ["x"] + (["hx"] if hx is not None else []) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        _close(a, b, dtype, f"grad {name}")


CELL_MODULES = {"lstm": (nn.LSTMCell, fusedrnn.LSTMCell, {}), "gru": (nn.GRUCell, fusedrnn.GRUCell, {}),
                "rnn_relu": (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("cell", list(CELL_MODULES))
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_nonfinite_cells_like_torch_nn(rng, backend, dtype, cell, value):
    torch_cls, fused_cls, kw = CELL_MODULES[cell]
    ref = torch_cls(4, 6, **kw).to(dtype)
    fused = fused_cls(4, 6, backend=backend, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, dtype=dtype)
    x[rng.randrange(5), rng.randrange(4)] = VALUES[value]
    results = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_()
        out = m(xi)
        outs = list(out) if isinstance(out, tuple) else [out]
        gen = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=dtype)).sum() for o in outs)
        results.append(outs + list(torch.autograd.grad(loss, [xi, *m.parameters()])))
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        _close(a, b, dtype, f"tensor {i}")
