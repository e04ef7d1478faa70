"""Derivatives beyond the first: double backward, gradient penalties and torch.func, on every
backend, against torch.nn and gradgradcheck.

The kernel backends give plain first derivatives from their fused backward and everything
else from the reference math (fusedrnn/backend/transforms.py). These tests would see zeros,
``None`` or a missing ``grad_fn`` where that path was missing.
"""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import fusedrnn
from conftest import assert_close, runs_on_cpu_tensors, takes_proj_size

MODULES = {"lstm": (nn.LSTM, fusedrnn.LSTM, {"proj_size": 2}), "gru": (nn.GRU, fusedrnn.GRU, {}),
           "rnn_tanh": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "tanh"}),
           "rnn_relu": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"})}




# The kernel backends in the dtype they are checked in: the Triton kernels have no float64;
# the CUDA ones run emulated on CPU threads (FUSEDRNN_CUDA_EMULATE=1).
BACKENDS = [pytest.param(name, dtype, id=name, marks=pytest.mark.skipif(
    not runs_on_cpu_tensors(name), reason=f"{name} unavailable"))
    for name, dtype in [("reference", torch.float64), ("cpu", torch.float64),
                        ("triton:persistent", torch.float32),
                        ("triton:alternating", torch.float32),
                        ("cuda:persistent", torch.float64), ("cuda:pointwise", torch.float64)]]
# gradgradcheck settings per dtype: float64 at its defaults; fp32 with a larger step and a
# tolerance for its rounding (a zero or missing second derivative is off by O(1), not 1e-2)
GRADCHECK = {torch.float64: {}, torch.float32: dict(eps=1e-2, atol=2e-2, rtol=2e-2)}


def make_pair(cell, dtype, backend, **extra):
    torch_cls, fused_cls, kw = MODULES[cell]
    if not takes_proj_size(backend, dtype):
        kw = {k: v for k, v in kw.items() if k != "proj_size"}  # the persistent kernels
    kw = dict(kw, **extra)
    ref = torch_cls(3, 4, **kw).to(dtype)
    fused = fused_cls(3, 4, backend=backend, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def flat_outputs(module, x, *states):
    hx = None if not states else (tuple(states) if len(states) == 2 else states[0])
    out, hidden = module(x, hx)
    return (out, *(hidden if isinstance(hidden, tuple) else (hidden,)))


@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_gradgradcheck(rng, backend, dtype, cell):
    """Second derivatives in the input, the initial states and every parameter of a
    bidirectional layer (float64). The Triton runs (fp32) and the CUDA ones (float64) check a
    one-direction layer in its input and states only: every forward of the numerical
    differentiation runs in Triton's interpreter or the CUDA emulation (a bidirectional
    persistent LSTM took 90 s)."""
    small = backend.startswith(("triton", "cuda"))
    if dtype != torch.float64 and cell == "rnn_relu":
        pytest.skip("relu's second derivative is 0 wherever it exists, and an fp32 finite "
                    "difference (eps 1e-2) straddles its kink: checked in float64 on the C++ "
                    "and reference backends, and by the gradient-penalty test here")
    _, fused = make_pair(cell, dtype, backend, bidirectional=not small)
    params = {k: v.detach().requires_grad_(not small) for k, v in fused.named_parameters()}
    steps, batch, directions = (2, 1, 1) if small else (3, 2, 2)
    x = torch.randn(steps, batch, 3, dtype=dtype, requires_grad=True)
    out_size = fused.proj_size or fused.hidden_size
    states = [torch.randn(directions, batch, out_size, dtype=dtype, requires_grad=True)]
    if cell == "lstm":
        states.append(torch.randn(directions, batch, 4, dtype=dtype, requires_grad=True))
    names = [k for k, v in params.items() if v.requires_grad]

    def fn(x, *tensors):
        p = dict(params, **dict(zip(names, tensors[:len(names)])))
        return flat_outputs(lambda *args: functional_call(fused, p, args), x, *tensors[len(names):])

    inputs = (x, *[params[n] for n in names], *states)
    assert torch.autograd.gradgradcheck(fn, inputs, **GRADCHECK[dtype])


@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_gradient_penalty_matches_torch_nn(rng, backend, dtype, cell):
    """WGAN-GP's pattern: the penalty on d(out)/d(x) must reach the weights, as in torch.nn."""
    ref, fused = make_pair(cell, dtype, backend, num_layers=2)
    x = torch.randn(4, 3, 3, dtype=dtype)
    results = []
    for module in (ref, fused):
        xi = x.clone().requires_grad_()
        out = module(xi)[0]
        (gx,) = torch.autograd.grad(out.pow(2).sum(), xi, create_graph=True)
        assert gx.grad_fn is not None
        loss = out.pow(2).sum() + (gx.norm() - 1) ** 2
        penalty_grads = torch.autograd.grad(gx.sum(), list(module.parameters()), retain_graph=True)
        assert all(g is not None for g in penalty_grads)
        results.append([loss, *penalty_grads, *torch.autograd.grad(loss, [xi, *module.parameters()])])
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert_close(a, b, dtype, f"tensor {i}")


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_create_graph_gradient_equals_the_fused_one(rng, backend, dtype):
    """The first derivative taken with create_graph=True (reference math) equals the fused
    backward's, so neither path can drift from the other unseen."""
    _, fused = make_pair("gru", dtype, backend, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=True)
    upstream = torch.randn(5, 2, 8, dtype=dtype)
    plain = torch.autograd.grad((fused(x)[0] * upstream).sum(), [x, *fused.parameters()])
    graph = torch.autograd.grad((fused(x)[0] * upstream).sum(), [x, *fused.parameters()],
                                create_graph=True)
    for i, (a, b) in enumerate(zip(graph, plain)):
        assert a.grad_fn is not None
        assert_close(a, b, dtype, f"gradient {i}")


# PyTorch's own test_nn.py cases, run on fusedrnn (they failed before double backward).

@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "convert"])
def test_pytorch_rnn_grad_and_gradgrad(mode, backend):
    """test_LSTM_grad_and_gradgrad / test_GRU_grad_and_gradgrad (test_nn.py)."""
    if backend == "cpu" and not runs_on_cpu_tensors("cpu"):
        pytest.skip("cpu unavailable")
    hsize = 4
    inp = torch.rand(1, 3, hsize, dtype=torch.float64, requires_grad=True)
    for bias in (True, False):
        if backend == "convert":
            mod = fusedrnn.convert(getattr(nn, mode)(hsize, hsize, bias=bias).double())
        else:
            mod = getattr(fusedrnn, mode)(hsize, hsize, bias=bias, backend=backend).double()

        def flatten_out(x):
            out = mod(x)
            return tuple(t if isinstance(t, torch.Tensor) else tt for t in out for tt in t)

        assert torch.autograd.gradcheck(flatten_out, inp, check_batched_grad=True)
        assert torch.autograd.gradgradcheck(flatten_out, inp, check_batched_grad=True)


def test_pytorch_lstm_differentiable_backward_using_onednn():
    """test_LSTM_differentiable_backward_using_oneDNN (test_nn.py): the gradient taken with
    create_graph=True is differentiable and matches torch.nn's."""
    bsz, seq_len, in_dim, hidden_size = 5, 7, 10, 8
    ref = nn.LSTM(in_dim, hidden_size, 1, batch_first=True)
    fused = fusedrnn.convert(nn.LSTM(in_dim, hidden_size, 1, batch_first=True))
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(bsz, seq_len, in_dim)
    grads = []
    for module in (ref, fused):
        inp = x.clone().requires_grad_()
        out, _ = module(inp)
        (gx,) = torch.autograd.grad(out.sum(), inp, create_graph=True)
        assert gx.grad_fn is not None
        grads.append([gx, *torch.autograd.grad(gx.pow(2).sum(), list(module.parameters()))])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# torch.func: every transform torch.nn's RNNs support, against torch.nn's results.

def _func_pair(backend, dtype):
    """(torch.nn in float64, fusedrnn in dtype, x): torch.nn's fp32 CPU LSTM runs oneDNN,
    which has no forward-mode derivative."""
    ref, fused = make_pair("lstm", dtype, backend, num_layers=2)
    return ref.double(), fused, torch.randn(3, 2, 3, dtype=dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_torch_func_grad_over_parameters(rng, backend, dtype):
    ref, fused, x = _func_pair(backend, dtype)
    results = []
    for module in (ref, fused):
        params = {k: v.detach() for k, v in module.named_parameters()}
        inp = x.to(params["weight_ih_l0"].dtype)
        g = torch.func.grad(lambda p: functional_call(module, p, (inp,))[0].pow(2).sum())(params)
        results.append(g)
    for name in results[0]:
        assert_close(results[1][name], results[0][name].to(dtype), dtype, name)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd", "hessian", "grad_of_grad"])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_torch_func_transforms_match_torch_nn(rng, backend, dtype, transform):
    ref, fused, x = _func_pair(backend, dtype)
    x = x[:2, :1]  # hessian of a small input

    def run(module, x):
        out = lambda inp: module(inp)[0]  # noqa: E731
        total = lambda inp: module(inp)[0].pow(2).sum()  # noqa: E731
        if transform == "jacrev":
            return torch.func.jacrev(out)(x)
        if transform == "jacfwd":
            return torch.func.jacfwd(out)(x)
        if transform == "hessian":
            return torch.func.hessian(total)(x)
        return torch.func.grad(lambda inp: torch.func.grad(total)(inp).pow(2).sum())(x)

    assert_close(run(fused, x), run(ref, x.double()).to(dtype), dtype, transform)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_torch_func_vmap(rng, backend, dtype):
    """torch.nn's RNNs have no vmap rule at all; fusedrnn's run once per vmapped entry, so
    the result equals a loop over the entries (checked on torch.nn)."""
    ref, fused, x = _func_pair(backend, dtype)
    xs = torch.randn(4, *x.shape, dtype=dtype)
    got = torch.func.vmap(lambda inp: fused(inp)[0])(xs)
    expected = torch.stack([ref(xi)[0] for xi in xs.double()])
    assert_close(got, expected.to(dtype), dtype, "vmap")
    grads = torch.func.vmap(torch.func.grad(lambda inp: fused(inp)[0].sum()))(xs)
    expected = torch.stack([torch.autograd.grad(ref(xi.requires_grad_())[0].sum(), xi)[0]
                            for xi in xs.double()])
    assert_close(grads, expected.to(dtype), dtype, "vmap of grad")
