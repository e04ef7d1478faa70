"""The fused C++ ``cpu`` backend against the reference backend and torch.nn, fresh inputs each run."""
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence

import fusedrnn
from fusedrnn import dispatch
from fusedrnn.backend.base import LayerSpec
from fusedrnn.backend.cpu import BACKEND
from fusedrnn.cells import CELLS
from conftest import assert_close
from sequence_check import (check_sequence, gradcheck_sequence, random_batch_sizes, run_sequence,
                            sequence_inputs)

pytestmark = pytest.mark.skipif(BACKEND.unavailable_reason() is not None,
                                reason=f"cpu backend: {BACKEND.unavailable_reason()}")

HIDDEN = [7, 13, 33]  # not multiples of any vector width
# Input scale per dtype: at 0.5 the float32 reference itself drifts past 1e-5 from the float64
# one (gradients grow through time). At 0.3 the float32 kernels still did in 4 of 2,400 random
# cases (the RNN cells' bias gradients, summed over every row: 2026-11-30, under both GEMM
# routes), a CI failure every ~40 runs; at 0.2, in none of 2,400.
SCALE = {torch.float64: 0.5, torch.float32: 0.2}


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sequence_matches_reference(rng, cell_name, packed, reverse, dtype):
    hidden = rng.choice(HIDDEN)
    batch_sizes = random_batch_sizes(rng, rng.randint(2, 7), rng.randint(2, 6), packed)
    check_sequence(BACKEND, cell_name, batch_sizes, hidden, reverse=reverse, dtype=dtype,
                   bias=rng.random() < 0.8, scale=SCALE[dtype])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_lstm_proj_matches_reference(rng, packed, reverse, dtype):
    batch_sizes = random_batch_sizes(rng, rng.randint(2, 6), rng.randint(2, 5), packed)
    check_sequence(BACKEND, "lstm", batch_sizes, hidden=rng.choice(HIDDEN), proj=rng.randint(1, 6),
                   reverse=reverse, dtype=dtype, scale=SCALE[dtype])


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("steps,batch", [(1, 3), (5, 1), (1, 1)], ids=["T1", "B1", "T1B1"])
def test_edge_sizes(rng, cell_name, steps, batch):
    batch_sizes = random_batch_sizes(rng, steps, batch, packed=False)
    check_sequence(BACKEND, cell_name, batch_sizes, hidden=rng.choice(HIDDEN),
                   reverse=rng.random() < 0.5)


@pytest.fixture
def two_threads():
    """The kernels split rows across intra-op threads; make sure there are two to split over."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_row_blocks_across_threads(rng, two_threads, cell_name):
    """Batch >= 16 runs one row block per thread (packed: blocks of unequal lengths)."""
    batch_sizes = random_batch_sizes(rng, 6, 40, packed=True)
    check_sequence(BACKEND, cell_name, batch_sizes, rng.choice(HIDDEN),
                   proj=3 if cell_name == "lstm" else 0, reverse=rng.random() < 0.5)


def test_row_split_gemms(two_threads):
    """The whole-sequence GEMM helpers, large enough to be split across threads."""
    a = torch.randn(3000, 70, dtype=torch.float64)
    b = torch.randn(70, 50, dtype=torch.float64)
    c = torch.randn(3000, 50, dtype=torch.float64)
    assert_close(torch.ops.fusedrnn.mm_rows(a, b), a @ b, torch.float64, "mm_rows")
    w = torch.randn(50, 70, dtype=torch.float64)
    assert_close(torch.ops.fusedrnn.mm_rows(a, w.t()), a @ w.t(), torch.float64, "mm_rows w^T")
    assert_close(torch.ops.fusedrnn.mm_tn(a, c), a.t() @ c, torch.float64, "mm_tn")


def test_float32_wide_layer_matches_float64_reference(rng):
    """Vector-width main loops (H=70: 4 full AVX-512 lanes + tail) at float32 tolerance."""
    for cell_name in CELLS:
        check_sequence(BACKEND, cell_name, random_batch_sizes(rng, 4, 9, packed=True), 70,
                       dtype=torch.float32, scale=0.2)


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_gradcheck(rng, cell_name):
    assert gradcheck_sequence(BACKEND, rng, cell_name, reverse=rng.random() < 0.5)


@pytest.mark.parametrize("kind", ["LSTM", "LSTM-proj", "GRU", "GRU-nobias", "RNN-relu"])
def test_module_matches_torch_nn(rng, kind):
    """Multi-layer, bidirectional, packed unsorted input: outputs, states and parameter grads."""
    mode, _, extra = kind.partition("-")
    kwargs = dict(num_layers=2, bidirectional=True, dtype=torch.float64)
    if extra == "proj":
        kwargs["proj_size"] = 4
    if extra == "relu":
        kwargs["nonlinearity"] = "relu"
    if extra == "nobias":
        kwargs["bias"] = False
    ref = getattr(nn, mode)(5, 9, **kwargs)
    fused = getattr(fusedrnn, mode)(5, 9, backend="cpu", **kwargs)
    fused.load_state_dict(ref.state_dict())
    lengths = [rng.randint(1, 6) for _ in range(4)]
    seqs = [torch.randn(n, 5, dtype=torch.float64) for n in lengths]
    outs = []
    for model in (ref, fused):
        xs = [s.clone().requires_grad_() for s in seqs]
        out, hidden = model(pack_sequence(xs, enforce_sorted=False))
        states = hidden if isinstance(hidden, tuple) else (hidden,)
        loss = (out.data * torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64)
                .view_as(out.data)).sum() + sum((s ** 2).sum() for s in states)
        loss.backward()
        outs.append([out.data, *states, *[x.grad for x in xs],
                     *[p.grad for p in model.parameters()]])
    for i, (a, b) in enumerate(zip(outs[1], outs[0])):
        assert_close(a, b, torch.float64, f"{kind} tensor {i}")


def test_inference_saves_nothing():
    """Under no_grad the forward keeps no activations for backward (train flag off)."""
    cell = CELLS["lstm"]
    args = sequence_inputs(cell, torch.tensor([3, 2]), hidden=4)
    with torch.no_grad():
        y, h, c = run_sequence(BACKEND, cell, args, reverse=False)
    assert y.grad_fn is None
    out = torch.ops.fusedrnn.sequence_forward("lstm", args["xp"].detach(), args["batch_sizes"],
                                              args["h0"].detach(), args["c0"].detach(),
                                              args["w_hh"].detach(), None, args["b_hh"].detach(), None,
                                              False, False)
    assert all(t.numel() == 0 for t in out[3:])
    torch.testing.assert_close(out[0], y)


@pytest.mark.parametrize("dtype,T,H", [(torch.float64, 64, 64), (torch.float32, 16, 256)],
                         ids=["f64", "f32-packed-w_hh"])
def test_cached_buffers_reused_without_aliasing(rng, dtype, T, H):
    """Buffers of 128 KiB and more come from the extension's cache (csrc/cpu/buffer_cache.h):
    two live training graphs must not share memory, a finished step's blocks are reused, and
    the tensors users get are ordinary ones. float32 at H=256 also takes the packed W_hh (1 MiB)
    from the cache."""
    torch.ops.fusedrnn.release_cached_buffers()
    in_use_before = torch.ops.fusedrnn.cached_buffer_bytes()[0]
    B, I = 32, 32  # LSTM activations: T*32 rows x 5*H values, 2.6 MB in both cases
    model = fusedrnn.LSTM(I, H, backend="cpu").to(dtype)
    ref = nn.LSTM(I, H).double()
    ref.load_state_dict(model.state_dict())

    def grads(m, x, gy):
        y, _ = m(x)
        return [y, *torch.autograd.grad(y, [x, *m.parameters()], gy)]

    xs = [(0.3 * torch.randn(T, B, I, dtype=dtype)).requires_grad_() for _ in range(2)]
    ys = [model(x)[0] for x in xs]  # both graphs alive at once
    assert torch.ops.fusedrnn.cached_buffer_bytes()[0] - in_use_before >= 2 * T * B * 5 * H * 8
    gys = [torch.randn_like(y) for y in ys]
    for x, y, gy in zip(xs, ys, gys):
        got = [y, *torch.autograd.grad(y, [x, *model.parameters()], gy)]
        x64 = x.detach().double().requires_grad_()
        for i, (a, b) in enumerate(zip(got, grads(ref, x64, gy.double()))):
            assert_close(a, b.to(dtype), dtype, f"tensor {i}")
    del ys, got, y
    in_use, idle = torch.ops.fusedrnn.cached_buffer_bytes()
    assert in_use == in_use_before and idle > 0
    grads(model, xs[0], gys[0])  # a second step of the same shape allocates no new block
    assert sum(torch.ops.fusedrnn.cached_buffer_bytes()) == in_use_before + idle
    assert torch.ops.fusedrnn.release_cached_buffers() == idle
    assert torch.ops.fusedrnn.cached_buffer_bytes()[1] == 0
    # Outputs from the cache are ordinary tensors to their users.
    y = model(xs[0])[0].detach()
    assert torch.ops.fusedrnn.cached_buffer_bytes()[0] > in_use_before
    saved = io.BytesIO()
    torch.save(y, saved)
    torch.testing.assert_close(torch.load(io.BytesIO(saved.getvalue())), y)
    y.resize_(2 * y.numel())
    y.resize_(16)


def test_torch_compile_runs_the_cpu_ops(rng):
    """torch.compile with default settings is not broken: without `allow_rnn` Dynamo runs the
    RNN module eagerly (a graph break), and the result equals eager mode's."""
    model = fusedrnn.LSTM(8, 16, 2, backend="cpu").double()
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for m in (model, torch.compile(model, backend="eager")):
        y, (h, c) = m(x)
        results.append([y, h, c, *torch.autograd.grad(y.sum() + c.sum(), [x, *m.parameters()])])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float64, f"tensor {i}")


@pytest.mark.parametrize("cell_name,proj", [("lstm", 0), ("lstm", 3), ("gru", 0),
                                            ("rnn_relu", 0)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_fake_kernels_match_the_ops(rng, cell_name, proj, train):
    """The shape-only kernels torch.compile traces with agree with the real ops (opcheck runs
    both on the same inputs and compares every output's shape, strides and dtype)."""
    cell = CELLS[cell_name]
    hidden = rng.choice(HIDDEN)
    args = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in sequence_inputs(
        cell, random_batch_sizes(rng, 4, 3, packed=True), hidden, proj=proj).items()}
    x, w_ih = torch.randn(args["xp"].shape[0], 6, dtype=torch.float64), \
        torch.randn(args["xp"].shape[1], 6, dtype=torch.float64)
    checks = ("test_schema", "test_faketensor")
    ops = torch.ops.fusedrnn
    torch.library.opcheck(ops.mm_rows, (x, w_ih.t().contiguous()), test_utils=checks)
    torch.library.opcheck(ops.mm_tn, (args["xp"], x), test_utils=checks)
    forward_args = (cell_name, args["xp"], args["batch_sizes"], args["h0"], args["c0"],
                    args["w_hh"], None, args["b_hh"], args["w_hr"], False, train)
    torch.library.opcheck(ops.sequence_forward, forward_args, test_utils=checks)
    # the whole stack: two bidirectional layers
    H, Hout, G = hidden, args["h0"].shape[1], cell.gates
    weights = []
    for layer in range(2):
        for _ in range(2):
            weights += [torch.randn(G * H, 6 if layer == 0 else 2 * Hout, dtype=torch.float64),
                        args["w_hh"], None, args["b_hh"], args["w_hr"]]
    mask = torch.rand(x.shape[0], 2 * Hout, dtype=torch.float64)  # dropout after layer 0
    stack_args = (cell_name, x, args["batch_sizes"], [args["h0"]] * 4, [args["c0"]] * 4,
                  weights, True, train, [mask])
    torch.library.opcheck(ops.stack_forward, stack_args, test_utils=checks)
    if train:  # stack_train: its autograd node too (opcheck's default checks, AOT included)
        grad_args = [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                     else t for t in (x, *weights)]
        torch.library.opcheck(ops.stack_train, (
            cell_name, grad_args[0], args["batch_sizes"], stack_args[3], stack_args[4],
            grad_args[1:], True, [mask]))
    if train:
        y, h_n, c_n, *saved = ops.sequence_forward(*forward_args)
        torch.library.opcheck(ops.sequence_backward, (
            cell_name, args["batch_sizes"], args["w_hh"], args["w_hr"], False, saved,
            torch.randn_like(y), torch.randn_like(h_n),
            torch.randn_like(c_n) if cell.has_cell_state else None), test_utils=checks)
        y, h_n, c_n, *saved = ops.stack_forward(*stack_args)
        for need_dx in (True, False):
            torch.library.opcheck(ops.stack_backward, (
                cell_name, args["batch_sizes"], x, weights, True, saved, torch.randn_like(y),
                torch.randn_like(h_n), torch.randn_like(c_n) if cell.has_cell_state else None,
                need_dx, [mask]), test_utils=checks)


@pytest.mark.parametrize("kind", ["LSTM-proj", "GRU-nobias", "RNN-relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_stack_op_runs_a_module_in_one_call(rng, monkeypatch, kind, dtype):
    """A whole module (every layer and direction, packed or padded) runs in one op call,
    stack_forward in inference (train false: nothing saved) and stack_train in training (its
    autograd node in C++, whose backward is one stack_backward call); values and gradients
    match torch.nn. Dropout between the layers runs inside the call too:
    with the same seed, values and gradients equal the layers run one by one."""
    calls = []
    cpu = fusedrnn.backend.cpu
    real_forward, real_train = cpu._stack_forward, cpu._stack_train
    monkeypatch.setattr(cpu, "_stack_forward",
                        lambda *args: calls.append(f"forward train={args[7]}") or
                        real_forward(*args))
    monkeypatch.setattr(cpu, "_stack_train",
                        lambda *args: calls.append("train") or real_train(*args))
    mode, _, extra = kind.partition("-")
    kwargs = dict(num_layers=rng.randint(1, 3), bidirectional=rng.random() < 0.7,
                  **{"proj": dict(proj_size=3), "nobias": dict(bias=False),
                     "relu": dict(nonlinearity="relu")}[extra])
    ref = getattr(nn, mode)(6, rng.choice(HIDDEN), **kwargs).to(dtype)
    fused = getattr(fusedrnn, mode)(6, ref.hidden_size, backend="cpu", **kwargs).to(dtype)
    fused.load_state_dict(ref.state_dict())
    seqs = [torch.randn(rng.randint(1, 6), 6, dtype=dtype) * 0.5 for _ in range(5)]
    for x in (pack_sequence(seqs, enforce_sorted=False), torch.randn(4, 3, 6, dtype=dtype)):
        with torch.no_grad():
            (out, hidden), (ref_out, ref_hidden) = fused(x), ref(x)
        assert calls == ["forward train=False"]
        calls.clear()
        out, ref_out = (o.data if isinstance(o, nn.utils.rnn.PackedSequence) else o
                        for o in (out, ref_out))
        assert_close(out, ref_out, dtype, f"{kind} y")
        for a, b in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                        ref_hidden if isinstance(ref_hidden, tuple) else (ref_hidden,)):
            assert_close(a, b, dtype, f"{kind} state")
    x = torch.randn(4, 3, 6, dtype=dtype, requires_grad=True)
    results = []
    for m in (fused, ref):
        y, h = m(x)
        h = h[0] if mode == "LSTM" else h
        results.append([y, h, *torch.autograd.grad((y * y).sum() + (h * h).sum(),
                                                   [x, *m.parameters()])])
    assert calls == ["train"]
    calls.clear()
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, dtype, f"{kind} training tensor {i}")
    fused.dropout = 0.3
    results, seed = [], rng.randrange(2**31)
    for one_call in (True, False):
        if not one_call:  # the base class's layer-by-layer stack, F.dropout between the layers
            monkeypatch.setattr(fusedrnn.backend.cpu.CpuBackend, "stack",
                                fusedrnn.backend.base.Backend.stack)
        torch.manual_seed(seed)
        y, h = fused.train()(x)
        h = h[0] if mode == "LSTM" else h
        results.append([y, h, *torch.autograd.grad((y * y).sum() + (h * h).sum(),
                                                   [x, *fused.parameters()])])
    assert calls == ["train"]
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, dtype, f"{kind} dropout tensor {i}")


@pytest.mark.parametrize("tool", ["saved-tensor hooks", "checkpoint", "reentrant checkpoint"])
def test_training_node_works_with_autograd_tools(rng, tool):
    """stack_train's C++ node saves through autograd's SavedVariable: saved-tensor hooks see
    its tensors, activation checkpointing (both kinds) recomputes through it, and a weight
    changed in place after the forward is autograd's RuntimeError at backward. Gradients
    match torch.nn in float64."""
    kwargs = dict(num_layers=2, bidirectional=rng.random() < 0.5)
    ref = nn.LSTM(5, 7, **kwargs).double()
    fused = fusedrnn.LSTM(5, 7, backend="cpu", **kwargs).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    packed = []  # what the hook saw of the fused module's saves
    results = []
    for m in (fused, ref):
        x.grad = None
        m.zero_grad()
        run = lambda inp: m(inp)[0]  # noqa: E731
        if tool == "saved-tensor hooks":
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: (m is fused and packed.append(t.shape)) or t.clone(),
                    lambda t: t):
                y = run(x)
        else:
            y = torch.utils.checkpoint.checkpoint(run, x,
                                                  use_reentrant=tool == "reentrant checkpoint")
        (y * y).sum().backward()
        results.append([x.grad.clone(), *[p.grad.clone() for p in m.parameters()]])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float64, f"{tool} gradient {i}")
    if tool == "saved-tensor hooks":
        assert len(packed) > 10  # x, the states, the weights, each layer's activations
    y = fused(x)[0]
    with torch.no_grad():
        fused.weight_hh_l0.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.filterwarnings("error::UserWarning")  # (Dynamo warned on an lru_cache once)
def test_torch_compile_fullgraph(rng, kind):
    """A whole model compiles into one graph (no break at the layers) and gives eager mode's
    values and gradients, with no warning; `allow_rnn` is Dynamo's own switch for
    torch.nn.RNNBase subclasses."""
    extra = {"LSTM": dict(proj_size=3), "GRU": dict(bias=False), "RNN": dict(nonlinearity="relu")}
    model = getattr(fusedrnn, kind)(6, rng.choice(HIDDEN), 2, bidirectional=True, backend="cpu",
                                    **extra[kind]).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()  # other tests' compilations of the same forward count as recompiles
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        results = []
        for m in (model, compiled):
            y, h = m(x)
            h = h[0] if kind == "LSTM" else h
            results.append([y, h, *torch.autograd.grad((y * y).sum() + h.sum(),
                                                       [x, *m.parameters()])])
            with torch.no_grad():
                results[-1].append(m(x)[0])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float64, f"tensor {i}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("grad", [True, False])
def test_torch_export(rng, kind, grad):
    """torch.export records the stack op (training: stack_train; no_grad: stack_forward) with a
    dynamic number of steps, and the exported program gives eager mode's values at another
    length. (Export once failed: choosing the backend called an op that lists the built cells,
    which export then tried to record.)"""
    model = getattr(fusedrnn, kind)(5, rng.choice(HIDDEN), 2, bidirectional=True).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    dispatch.forget_choices()  # (the choice is what ran the op)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(
            model, (x,), dynamic_shapes=({0: torch.export.Dim("steps", min=2, max=64)},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert ("fusedrnn.stack_train.default" if grad else "fusedrnn.stack_forward.default") in ops
    other = torch.randn(rng.randint(5, 9), 3, 5, dtype=torch.float64)
    got, want = program.module()(other), model(other)
    assert_close(got[0], want[0], torch.float64)
    assert_close(got[1][0], want[1][0], torch.float64)


def test_auto_picks_cpu_and_falls_back():
    cell = CELLS["lstm"]
    cpu = torch.device("cpu")
    assert dispatch.select("auto", LayerSpec(cpu, torch.float32, cell, 8)).name == "cpu"
    assert dispatch.select("auto", LayerSpec(cpu, torch.bfloat16, cell, 8)).name == "cpu"
    assert dispatch.select("auto", LayerSpec(cpu, torch.float16, cell, 8)).name == "reference"
    with pytest.raises(dispatch.BackendUnavailableError, match="float16"):
        dispatch.select("cpu", LayerSpec(cpu, torch.float16, cell, 8))


def test_bad_arguments_raise_clear_errors():
    cell = CELLS["gru"]
    args = sequence_inputs(cell, torch.tensor([2, 3]), hidden=4)  # increasing counts
    with pytest.raises(RuntimeError, match="non-increasing"):
        run_sequence(BACKEND, cell, args, reverse=False)
    args = sequence_inputs(cell, torch.tensor([3, 2]), hidden=4)
    args["batch_sizes"] = torch.tensor([3, 3])
    with pytest.raises(RuntimeError, match="rows"):
        run_sequence(BACKEND, cell, args, reverse=False)


def test_cpp_cells_match_the_registry():
    """csrc/cells/cells.h lists the C++ cells: each has the registry's traits (gates, states,
    reads h, split hidden gradient, saved values), so the Python side restates nothing."""
    from fusedrnn.cells import built_cell_reason
    names = torch.ops.fusedrnn.cell_names()
    assert sorted(names) == sorted(CELLS)
    for name in names:
        traits = tuple(torch.ops.fusedrnn.cell_traits(name))
        assert built_cell_reason(CELLS[name], traits, "C++") is None, (name, traits)
        assert "traits" in built_cell_reason(CELLS[name], (9, *traits[1:]), "C++")
    with pytest.raises(RuntimeError, match="unknown cell"):
        torch.ops.fusedrnn.cell_traits("lstm2")


# The forward's GEMM routes (csrc/cpu/sequence.cpp, GemmRoute): each forced in turn; avx512
# (our micro-kernel) where the build has AVX-512.
@pytest.fixture(params=["mkl", "onednn", "avx512"])
def gemm_route(request, monkeypatch):
    if request.param == "avx512" and torch.ops.fusedrnn.avx512_route_reason():
        pytest.skip(f"avx512 route: {torch.ops.fusedrnn.avx512_route_reason()}")
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_gemm_routes_match_reference(rng, two_threads, gemm_route, cell_name):
    """float32 training forward and backward against the float64 reference: packed rows over
    two threads, hidden sizes that end in a partial 64-unit tile (and a partial 16-unit panel),
    row counts that end in a partial avx512 row block, LSTM with and without proj."""
    check_sequence(BACKEND, cell_name, random_batch_sizes(rng, 5, 40, packed=True),
                   hidden=rng.choice([70, 100, 13]), proj=rng.choice([0, 3]) if cell_name == "lstm"
                   else 0, reverse=rng.random() < 0.5, dtype=torch.float32, scale=0.1)


@pytest.mark.parametrize("kind", ["LSTM", "LSTM-proj", "GRU", "RNN"])
def test_gemm_routes_inference_matches_torch_nn(rng, two_threads, gemm_route, kind):
    """Inference (no saves: the tiles read h from their own copy) on a 2-layer bidirectional
    packed module, float32, against torch.nn."""
    mode, _, extra = kind.partition("-")
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=5 if extra else 0)
    if mode != "LSTM":
        del kwargs["proj_size"]
    ref = getattr(nn, mode)(11, 70, **kwargs)
    fused = getattr(fusedrnn, mode)(11, 70, backend="cpu", **kwargs)
    fused.load_state_dict(ref.state_dict())
    seqs = [torch.randn(rng.randint(1, 9), 11) * 0.3 for _ in range(37)]
    with torch.no_grad():
        (out, hidden), (ref_out, ref_hidden) = (
            m(pack_sequence(seqs, enforce_sorted=False)) for m in (fused, ref))
    assert_close(out.data, ref_out.data, torch.float32, f"{kind} {gemm_route} y")
    for a, b in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                    ref_hidden if isinstance(ref_hidden, tuple) else (ref_hidden,)):
        assert_close(a, b, torch.float32, f"{kind} {gemm_route} state")


@pytest.mark.parametrize("route", ["onednn", "avx512"])
def test_float32_routes_leave_float64_on_mkl(rng, monkeypatch, route):
    """The tiles and our micro-kernel are float32 only: forced, float64 still matches torch.nn
    to 1e-10."""
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", route)
    ref = nn.GRU(6, 70, dtype=torch.float64)
    fused = fusedrnn.GRU(6, 70, backend="cpu", dtype=torch.float64)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    assert_close(fused(x)[0], ref(x)[0], torch.float64, f"float64 under {route}")


def test_gemm_route_setting_errors(monkeypatch):
    """A bad FUSEDRNN_CPU_GEMM, or onednn where torch cannot run it, is a RuntimeError; auto
    then measures only what can run."""
    lstm = fusedrnn.LSTM(3, 8, backend="cpu")
    x = torch.randn(2, 20, 3)
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "openblas")
    with pytest.raises(RuntimeError, match="FUSEDRNN_CPU_GEMM must be mkl, onednn, avx512 or auto"):
        lstm(x)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert "mkldnn is disabled" in fusedrnn.cpu_info()["onednn_route"]
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "onednn")
    with pytest.raises(RuntimeError, match="cannot run here: torch.backends.mkldnn is disabled"):
        lstm(x)
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "auto")
    ref = nn.LSTM(3, 8)
    ref.load_state_dict(lstm.state_dict())
    assert_close(lstm(x)[0], ref(x)[0], torch.float32, "auto without oneDNN")


def test_cpu_info_reports_the_machine_and_measured_routes(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_CPU_GEMM", raising=False)
    hidden = 40 + torch.randint(0, 1000, ()).item()  # a shape no other test measured
    fusedrnn.RNN(3, hidden, backend="cpu")(torch.randn(3, 2, 3))[0].sum().backward()
    info = fusedrnn.cpu_info()
    assert info["gemm_route"] == "auto" and info["threads"] == torch.get_num_threads()
    assert info["cpu"] and info["isa"]
    assert info["onednn_route"].startswith(("available", "unavailable: "))
    assert info["bf16_route"].startswith(("available", "unavailable: "))
    assert info["avx512_route"].startswith(("available", "unavailable: "))
    if "avx512f" not in info["isa"].split():
        assert info["avx512_route"].startswith("unavailable: ")
    # (avx512 needs the CPU and a build for it: FUSEDRNN_ARCH_FLAGS can build without)
    assert info["pointwise"] in ("avx512", "compiler-vectorized")
    if "avx512f" not in info["isa"].split():
        assert info["pointwise"] == "compiler-vectorized"
    for kind in (" training", " backward"):  # the forward's and the backward's step GEMMs
        assert any(line.startswith(f"rnn_tanh{kind} batch 2 hidden {hidden},") and
                   any(f": {route} (" in line for route in ("mkl", "onednn", "avx512"))
                   for line in info["measured_routes"]), kind


def _gate_activations(x):
    """sigmoid(x) and tanh(x) as the float32 LSTM forward computes them: x is every gate's
    pre-activation (zero W_hh, no biases, zero states; x laid out as rows of 37 units, so that
    the last 16-unit chunk of each row is partial) and the training forward saves the activated
    gates: i, f and o are sigmoids, g a tanh."""
    H = 37
    rows = -(-x.numel() // H)
    xr = torch.cat([x, x.new_zeros(rows * H - x.numel())]).view(rows, 1, H)
    saved = torch.ops.fusedrnn.sequence_forward(
        "lstm", xr.expand(rows, 4, H).reshape(rows, 4 * H), torch.tensor([rows]),
        torch.zeros(rows, H), torch.zeros(rows, H), torch.zeros(4 * H, H), None, None, None,
        False, True)[3]
    i, f, g, o, _ = (a.reshape(-1)[:x.numel()] for a in saved.view(rows, 5, H).unbind(1))
    for other in (f, o):
        torch.testing.assert_close(other, i, rtol=0, atol=0, equal_nan=True)
    return i, g


def gate_math_problems():
    """Where the float32 sigmoid and tanh of the pointwise pass miss float64 by more than 4 ulp
    (relative), or 1.2e-7 absolute for tanh (near 0 it is 1 - 2 / (e^2x + 1) on the AVX-512
    path): a dense sweep through [-100, 100] and every special value. Returns the bad inputs."""
    sweep = torch.linspace(-100, 100, 200_003)
    fine = torch.linspace(-1e-3, 1e-3, 2001)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -1e-30,
                             88.72, -88.72, 44.36, -44.36, 87.3, -87.3, 89.0, -89.0, 1e30, -1e30])
    x = torch.cat([sweep, fine, specials])
    sig, tanh = _gate_activations(x)
    problems = []
    for name, got, want, abs_tol in (("sigmoid", sig, torch.sigmoid(x.double()), 1e-37),
                                     ("tanh", tanh, torch.tanh(x.double()), 1.2e-7)):
        err = (got.double() - want).abs()
        tol = torch.maximum(want.abs() * 4 * 2.0 ** -23, torch.full_like(want, abs_tol))
        bad = ~(err <= tol) & ~(want.isnan() & got.isnan())
        problems += [f"{name}({v:.9g}) = {g:.9g}, float64 {w:.9g}" for v, g, w in
                     zip(x[bad].tolist(), got[bad].tolist(), want[bad].tolist())][:5]
    return problems


def test_gate_math_matches_float64():
    """The pointwise pass's own sigmoid and tanh (AVX-512 here where the build has it)."""
    assert gate_math_problems() == []


def test_compiler_vectorized_path_matches_float64_and_the_reference():
    """FUSEDRNN_CPU_AVX512=0 runs the float loop that builds without AVX-512 use (read once per
    process, so in a child): its gate math, and float32 sequences of every cell against the
    float64 reference."""
    code = ("import sys, torch, fusedrnn, random; sys.path.insert(0, 'tests')\n"
            "from test_backend_cpu import gate_math_problems, BACKEND, SCALE\n"
            "from sequence_check import check_sequence, random_batch_sizes\n"
            "assert torch.ops.fusedrnn.pointwise_isa() == 'compiler-vectorized'\n"
            "assert gate_math_problems() == [], gate_math_problems()\n"
            "rng = random.Random()\n"
            "for cell in ('lstm', 'gru', 'rnn_tanh', 'rnn_relu'):\n"
            "    for packed in (False, True):\n"
            "        check_sequence(BACKEND, cell, random_batch_sizes(rng, 5, 4, packed),\n"
            "                       rng.choice([7, 33]), reverse=packed, dtype=torch.float32,\n"
            "                       scale=SCALE[torch.float32])\n"
            "print('ok')\n")
    env = dict(os.environ, FUSEDRNN_CPU_AVX512="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def _bf16_run(model, seqs, dtype):
    """Outputs, states, input and parameter gradients of one packed call, as float64."""
    xs = [s.detach().to(dtype).requires_grad_() for s in seqs]
    out, hidden = model(pack_sequence(xs, enforce_sorted=False))
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    weight = torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64).view_as(out.data)
    ((out.data.double() * weight).sum() + sum((s.double() ** 2).sum() for s in states)).backward()
    return [t.double() for t in (out.data, *states, *[x.grad for x in xs],
                                 *[p.grad for p in model.parameters()])]


@pytest.mark.parametrize("kind", ["LSTM", "LSTM-proj", "GRU", "RNN"])
@pytest.mark.parametrize("hidden", [7, 100], ids=["H7", "H100"])
def test_bfloat16_matches_float64_normwise(rng, two_threads, kind, hidden):
    """A bfloat16 module (step GEMMs on bf16 operands, states and gates in float32) against
    float64 torch.nn, normwise per tensor at 3e-2: 2 layers, bidirectional, packed unsorted;
    hidden 7 (odd K, padded for the VNNI layout) and 100 (a full 64-unit tile and a partial
    one). Over 12 draws per case the worst was 1.4e-2, and one draw in about 200 passed 2e-2;
    torch.nn's own bf16 layers measure 0.8-3.3e-2 here. A tensor past 3e-2 still passes if
    torch.nn's bf16 layer, on the same draw, is off by at least two thirds as much: a weight
    gradient that cancels to a small norm (seen: LSTM-proj's reverse w_hh gradient, norm 0.011,
    fusedrnn 8.8e-2 off and torch.nn's bf16 9.7e-2, about one draw in a few hundred)."""
    mode, _, extra = kind.partition("-")
    kwargs = dict(num_layers=2, bidirectional=True, **({"proj_size": 3} if extra else {}))
    ref = getattr(nn, mode)(6, hidden, dtype=torch.float64, **kwargs)
    fused = getattr(fusedrnn, mode)(6, hidden, backend="cpu", **kwargs)
    fused.load_state_dict(ref.state_dict())
    fused.bfloat16()
    seqs = [torch.randn(rng.randint(1, 8), 6, dtype=torch.float64) * 0.5 for _ in range(35)]
    torch_bf16 = getattr(nn, mode)(6, hidden, dtype=torch.bfloat16, **kwargs)
    torch_bf16.load_state_dict(ref.state_dict())
    for i, (a, b, c) in enumerate(zip(_bf16_run(fused, seqs, torch.bfloat16),
                                      _bf16_run(ref, seqs, torch.float64),
                                      _bf16_run(torch_bf16, seqs, torch.bfloat16))):
        err, scale, torch_err = [(a - b).abs().max().item(), b.abs().max().item(),
                                 (c - b).abs().max().item()]
        assert err <= max(3e-2 * scale + 1e-6, 1.5 * torch_err), \
            f"{kind} tensor {i}: {err:.3g} > 3e-2 x {scale:.3g} (torch.nn bf16: {torch_err:.3g})"


def test_bfloat16_runs_its_step_gemms_in_bfloat16(rng, monkeypatch):
    """The bf16 weights reach the kernels (outputs and dtypes bf16, inference too), and the step
    GEMMs take bf16 operands: the answer differs from the float32 GEMMs on the widened weights
    (FUSEDRNN_CPU_GEMM=mkl), and both are close."""
    if torch.ops.fusedrnn.bf16_route_reason():
        pytest.skip(f"no bf16 brgemm here: {torch.ops.fusedrnn.bf16_route_reason()}")
    lstm = fusedrnn.LSTM(10, 40, backend="cpu").bfloat16()
    x = (torch.randn(12, 20, 10) * 0.5).bfloat16()
    with torch.no_grad():
        y, (h, c) = lstm(x)
        monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "mkl")
        y_wide = lstm(x)[0]
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    assert not torch.equal(y, y_wide)
    assert (y.float() - y_wide.float()).abs().max() < 2e-2


@pytest.mark.parametrize("kind", ["LSTM-proj", "GRU", "RNN-relu"])
def test_bfloat16_inference_runs_the_stack_op(rng, monkeypatch, kind):
    """A bfloat16 module in inference runs in one stack_forward call whose results equal the
    layers run one by one bit for bit (bf16 projections, float32 states, each layer's output
    rounded to bf16); its training still runs layer by layer, and the op refuses train with
    bf16 (its backward has no bf16 path)."""
    mode, _, extra = kind.partition("-")
    kwargs = dict(num_layers=rng.randint(2, 3), bidirectional=rng.random() < 0.7,
                  **{"proj": dict(proj_size=3), "relu": dict(nonlinearity="relu"),
                     "": {}}[extra])
    model = getattr(fusedrnn, mode)(6, rng.choice(HIDDEN), backend="cpu", **kwargs).bfloat16()
    seqs = [(torch.randn(rng.randint(1, 6), 6) * 0.5).bfloat16() for _ in range(5)]
    inputs = (pack_sequence(seqs, enforce_sorted=False), torch.randn(4, 3, 6).bfloat16())
    cpu = fusedrnn.backend.cpu
    calls = []
    real = cpu._stack_forward
    monkeypatch.setattr(cpu, "_stack_forward", lambda *a: calls.append(a[1].dtype) or real(*a))
    results = []
    for one_call in (True, False):
        if not one_call:
            monkeypatch.setattr(cpu.CpuBackend, "stack", fusedrnn.backend.base.Backend.stack)
        for x in inputs:
            with torch.no_grad():
                y, h = model(x)
            results.append([y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y,
                            *(h if isinstance(h, tuple) else (h,))])
    assert calls == [torch.bfloat16, torch.bfloat16]
    for i, (a, b) in enumerate(zip(results[0] + results[1], results[2] + results[3])):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"tensor {i}: {m}")
    with pytest.raises(RuntimeError, match="inference only"):
        x = torch.randn(4 * 3, 6).bfloat16()
        w = [t.detach() for t in model._flat_weights]
        real(CELLS[mode.lower() if mode != "RNN" else "rnn_relu"].name, x,
             torch.full((4,), 3, dtype=torch.int64), [torch.zeros(3, 1).bfloat16()],
             [None], w[:4] + [None], False, True, [])


def test_bfloat16_without_onednn_widens_the_weights(rng, monkeypatch):
    """With oneDNN off (or forced mkl) a bfloat16 module's step GEMMs run in float32 on the
    widened weights: still within 3e-2 normwise of float64."""
    ref = nn.GRU(5, 20, dtype=torch.float64)
    fused = fusedrnn.GRU(5, 20, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    fused.bfloat16()
    seqs = [torch.randn(rng.randint(1, 6), 5, dtype=torch.float64) * 0.5 for _ in range(9)]
    expected = _bf16_run(ref, seqs, torch.float64)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    for i, (a, b) in enumerate(zip(_bf16_run(fused, seqs, torch.bfloat16), expected)):
        assert (a - b).abs().max() <= 3e-2 * b.abs().max() + 1e-6, f"tensor {i}"


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", ["empty batch", "zero-width h"])
def test_degenerate_shapes_under_every_gemm_route(gemm_route, w_dtype, shape):
    """The ops called directly with an empty batch, or a projection to zero width (K = 0 for
    the step GEMMs), under each route and bf16 weights: outputs of the right shapes, never a
    crash (the route probe once divided by an empty batch's zero flops: SIGFPE) or oneDNN's
    K = 0 errors."""
    batch, h_out = (0, 2) if shape == "empty batch" else (3, 0)
    counts = torch.tensor([batch, batch])
    for train in (False, True):  # (the training call's saves feed the backward below)
        y, h_n, c_n, *saved = torch.ops.fusedrnn.sequence_forward(
            "lstm", torch.randn(2 * batch, 16), counts, torch.zeros(batch, h_out),
            torch.zeros(batch, 4), torch.randn(16, h_out).to(w_dtype), None, None,
            torch.randn(h_out, 4), False, train)
        assert y.shape == (2 * batch, h_out) and h_n.shape == (batch, h_out)
    grads = torch.ops.fusedrnn.sequence_backward(
        "lstm", counts, torch.randn(16, h_out).to(w_dtype), torch.randn(h_out, 4), False, saved,
        torch.randn(2 * batch, h_out), torch.randn(batch, h_out), torch.randn(batch, 4))
    assert grads[0].shape == (2 * batch, 16) and grads[3].shape == (16, h_out)


@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_fake_kernels_match_the_ops_with_bf16_weights(rng, cell_name):
    """A bfloat16 module's calls (float32 tensors, bf16 w_hh; the stack op's bf16 inference):
    the fake kernels give the real ops' dtypes (float32 gradients from a bf16 w_hh), so a
    compiled bf16 model is traced right."""
    cell = CELLS[cell_name]
    args = {k: v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v for k, v in sequence_inputs(cell, random_batch_sizes(rng, 4, 3, packed=True),
                                               rng.choice(HIDDEN)).items()}
    w_hh = args["w_hh"].bfloat16()
    checks = ("test_schema", "test_faketensor")
    ops = torch.ops.fusedrnn
    forward_args = (cell_name, args["xp"], args["batch_sizes"], args["h0"], args["c0"], w_hh,
                    None, args["b_hh"], None, False, True)
    torch.library.opcheck(ops.sequence_forward, forward_args, test_utils=checks)
    y, h_n, c_n, *saved = ops.sequence_forward(*forward_args)
    torch.library.opcheck(ops.sequence_backward, (
        cell_name, args["batch_sizes"], w_hh, None, False, saved, torch.randn_like(y),
        torch.randn_like(h_n), torch.randn_like(c_n) if cell.has_cell_state else None),
        test_utils=checks)
    # a bfloat16 module's inference through the stack op: bf16 in, bf16 out
    H, rows, low = args["h0"].shape[1], args["xp"].shape[0], torch.bfloat16
    weights = [torch.randn(cell.gates * H, 5).to(low), w_hh, None,
               args["b_hh"].to(low), None]
    torch.library.opcheck(ops.stack_forward, (
        cell_name, torch.randn(rows, 5).to(low), args["batch_sizes"], [args["h0"].to(low)],
        [args["c0"].to(low) if cell.has_cell_state else None], weights, False, False, []),
        test_utils=checks)


def test_torch_compile_bfloat16_model(rng):
    """A bfloat16 LSTM compiles into one graph and gives eager mode's outputs and gradients."""
    model = fusedrnn.LSTM(6, 20, 2, backend="cpu").bfloat16()
    x = torch.randn(5, 3, 6).bfloat16().requires_grad_()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        results = []
        for m in (model, compiled):
            y, (h, c) = m(x)
            results.append([y, h, *torch.autograd.grad(y.float().square().sum(),
                                                       [x, *m.parameters()])])
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype == torch.bfloat16, f"tensor {i}: {a.dtype} {b.dtype}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("k", [0, 1, 7, 100])
def test_mm_rows_on_bf16_operands_gives_float32(two_threads, k):
    """A bfloat16 module's input projection: bf16 operands (odd K padded for VNNI; K = 0), a
    float32 result exact to float32 rounding of the bf16 products' sums, over several row chunks
    and column panels; its fake kernel agrees."""
    a = torch.randn(333, k).bfloat16()
    b = torch.randn(150, k).bfloat16().t()  # strided, as w_ih.t()
    out = torch.ops.fusedrnn.mm_rows(a, b)
    assert out.dtype == torch.float32 and out.shape == (333, 150)
    assert_close(out.double(), a.double() @ b.double(), torch.float32, "bf16 mm_rows")
    torch.library.opcheck(torch.ops.fusedrnn.mm_rows, (a, b),
                          test_utils=("test_schema", "test_faketensor"))


def test_calls_from_several_python_threads_match_sequential_calls(rng):
    """The extension's caches (buffers, measured GEMM routes) are shared by the process: layers
    called from several Python threads at once (a server, a data-parallel loop) must give
    bit-identical results to the same calls made one after another."""
    import threading
    torch.manual_seed(rng.randrange(2**31))
    jobs = []
    for i, (kind, bidirectional) in enumerate([(nn.LSTM, False), (nn.GRU, True), (nn.LSTM, False),
                                               (nn.RNN, True)]):
        model = fusedrnn.convert(kind(6, rng.choice(HIDDEN), 2, bidirectional=bidirectional),
                                 backend="cpu")
        inputs = [torch.randn(8 + j % 3, 3 + i, 6, requires_grad=True) for j in range(12)]
        jobs.append((model, inputs))

    def run(model, inputs):
        results = []
        for x in inputs:
            model.zero_grad()
            x.grad = None
            y = model(x)[0]
            (y * y).sum().backward()
            with torch.no_grad():
                y_inference = model(x)[0]
            results += [y.detach(), y_inference, x.grad, *(p.grad for p in model.parameters())]
        return results

    want = [run(*job) for job in jobs]
    got = [None] * len(jobs)
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, run(*jobs[k])))
               for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got):
        assert g is not None and len(g) == len(w)
        for a, b in zip(w, g):
            assert torch.equal(a, b)
