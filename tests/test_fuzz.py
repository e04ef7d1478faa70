"""Differential fuzzing against torch.nn: random configurations, input forms and malformed
inputs, run through torch.nn and fusedrnn side by side. Either both raise the same exception
class, or both succeed with outputs and every gradient equal (NaN and Inf by position).

Examples per backend: ``FUSEDRNN_FUZZ_EXAMPLES`` (default 40; the Triton backends, which run
in the interpreter, a quarter of it). A long run:
``FUSEDRNN_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py``.

Where torch.nn does not check an input (a packed LSTM's features and state shape; counts that
do not fit its rows) and accepts it, reads past it or would crash, fusedrnn must raise a
RuntimeError instead (``unsafe``: torch.nn not run; ``unchecked``: compared only where
torch.nn raises).
"""
import os

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from conftest import runs_on_cpu_tensors, takes_proj_size

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("FUSEDRNN_FUZZ_EXAMPLES", "40"))

# (backend, dtype, examples): the Triton kernels have no float64 and run in the interpreter;
# the CUDA ones run emulated (each launch starts OS threads). bfloat16 (`cpu`: bf16 GEMMs,
# float32 states) against torch.nn's bf16 layers: the same exceptions, and outputs and
# gradients of the same shapes and dtypes. Not the values: both sides are approximations
# (torch.nn's all-bf16 relu layers drift by tens of percent); test_backend_cpu compares bf16
# with float64.
BACKENDS = [("reference", torch.float64, EXAMPLES), ("cpu", torch.float64, EXAMPLES),
            ("cpu", torch.bfloat16, EXAMPLES),
            ("triton:persistent", torch.float32, max(1, EXAMPLES // 4)),
            ("triton:alternating", torch.float32, max(1, EXAMPLES // 4)),
            ("cuda:persistent", torch.float64, max(1, EXAMPLES // 4)),
            ("cuda:pointwise", torch.float64, max(1, EXAMPLES // 4))]

MODULE_KINDS = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
CELL_KINDS = ["LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"]
MODULE_FAULTS = [None] * 12 + [
    "feature_size", "input_rank", "input_dtype", "input_long", "list_input", "state_batch",
    "state_layers", "state_hidden", "state_rank", "state_dtype", "state_count", "state_as_list",
    "empty_sequence", "empty_batch", "counts_increasing", "counts_sum_more", "counts_sum_less",
    "counts_negative", "counts_int32", "counts_float", "counts_2d", "counts_empty",
    "sorted_indices_short", "sorted_indices_out_of_range", "noncontiguous_data", "nan", "inf",
    "neg_inf"]
CELL_FAULTS = [None] * 6 + [
    "feature_size", "input_rank", "input_dtype", "state_rank", "batched_input_1d_state",
    "state_batch", "state_hidden", "state_dtype", "state_count", "nan", "inf"]


def _construct(kind, dtype, backend, cfg):
    """(torch.nn module, fusedrnn module) with the same weights."""
    if kind.startswith(("LSTM", "GRU", "RNN")) and "Cell" not in kind:
        mode, _, nonlin = kind.partition("_")
        kw = dict(num_layers=cfg["layers"], bias=cfg["bias"], batch_first=cfg["batch_first"],
                  bidirectional=cfg["bidirectional"], dropout=cfg["dropout"])
        if nonlin:
            kw["nonlinearity"] = nonlin.lower()
        if mode == "LSTM" and cfg["proj"]:
            kw["proj_size"] = cfg["proj"]
        pair = getattr(nn, mode)(cfg["input"], cfg["hidden"], **kw), \
            getattr(fusedrnn, mode)(cfg["input"], cfg["hidden"], backend=backend, **kw)
    else:
        name, _, nonlin = kind.partition("_")
        kw = dict(bias=cfg["bias"], **({"nonlinearity": nonlin.lower()} if nonlin else {}))
        pair = getattr(nn, name)(cfg["input"], cfg["hidden"], **kw), \
            getattr(fusedrnn, name)(cfg["input"], cfg["hidden"], backend=backend, **kw)
    ref, fused = (m.to(dtype) for m in pair)
    fused.load_state_dict(ref.state_dict())
    ref.train(cfg["train"]), fused.train(cfg["train"])
    return ref, fused


def _other_float(dtype):
    return torch.float32 if dtype == torch.float64 else torch.float64


def _module_case(kind, dtype, cfg, fault, gen):
    """(inputs builder, torch.nn unsafe?): the builder returns (input, hx, leaves) afresh."""
    lstm = kind == "LSTM"
    if fault in ("counts_increasing", "counts_2d") and cfg["steps"] < 2:
        fault = None  # one step cannot increase; [[n]] is a valid count
    steps = 0 if fault == "empty_sequence" else cfg["steps"]
    batch = 0 if fault == "empty_batch" else cfg["batch"]
    form = cfg["form"]
    if fault and fault.startswith(("counts", "sorted", "noncontiguous")):
        form = "packed_unsorted" if fault.startswith("sorted") else "packed_sorted"
    if batch == 0 and form.startswith("packed"):
        form = "padded"
    directions = 2 if cfg["bidirectional"] else 1
    out_size = cfg["proj"] if lstm and cfg["proj"] else cfg["hidden"]
    feature = cfg["input"] + (1 if fault == "feature_size" else 0)
    x0 = torch.randn(steps, batch, feature, generator=gen, dtype=torch.float64)
    if fault in ("nan", "inf", "neg_inf") and x0.numel():
        x0.view(-1)[int(torch.randint(x0.numel(), (1,), generator=gen))] = \
            {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[fault]
    lengths = torch.randint(1, max(steps, 1) + 1, (batch,), generator=gen)
    if batch:
        lengths[int(torch.randint(batch, (1,), generator=gen))] = max(steps, 1)
    if form == "packed_sorted":
        lengths = lengths.sort(descending=True).values
    layers = cfg["layers"] * directions + (1 if fault == "state_layers" else 0)
    state_batch = batch + (1 if fault == "state_batch" else 0)
    unbatched = form == "unbatched"
    lead = (layers,) if unbatched else (layers, state_batch)
    if fault == "state_rank":
        lead = (layers, state_batch, 1) if not unbatched else (layers * state_batch,)
    h0 = torch.randn(*lead, out_size + (1 if fault == "state_hidden" else 0), generator=gen,
                     dtype=torch.float64)
    c0 = torch.randn(*lead, cfg["hidden"], generator=gen, dtype=torch.float64)
    given_state = cfg["given_state"] or (fault or "").startswith(("state", "sorted"))
    packed = form.startswith("packed")
    # torch.nn's LSTM checks neither its packed input's rank and features nor the given
    # state's shape nor its counts: its C++ then reads past buffers (seen: a segfault), so it
    # is not run
    unsafe = lstm and packed and (
        fault in ("feature_size", "input_rank", "state_batch", "state_layers", "state_hidden",
                  "state_rank", "sorted_indices_short")
        or (given_state and (fault in ("counts_increasing", "counts_2d", "counts_sum_more")
                             or (fault == "counts_sum_less" and steps == 1))))
    # (unsorted: the permutation keeps the batch's rows of a longer state, in both)
    unsafe &= not (fault == "state_batch" and form == "packed_unsorted")
    unchecked = False
    # rows past the counts' sum: torch.nn's reverse direction reads other rows than its forward
    unchecked |= fault == "counts_sum_less" and cfg["bidirectional"]
    # counts [0] for a packed LSTM's one row: torch.nn answers by dtype (float64: no rows;
    # float32: a shape error), fusedrnn raises
    unchecked |= lstm and packed and fault == "counts_sum_less" and steps == 1 and batch == 1
    # the same counts with equal steps in float32 or bf16: torch.nn's oneDNN LSTM views the
    # data as [T, B, I] and raises a shape error, though it ignores the extra rows when the
    # counts differ and in float64; fusedrnn ignores them in every case (README)
    ref_quirk = lstm and packed and fault == "counts_sum_less" and dtype != torch.float64

    def build():
        x_dtype = torch.long if fault == "input_long" else \
            (_other_float(dtype) if fault == "input_dtype" else dtype)
        x = x0.to(x_dtype)
        leaves = []
        if x.is_floating_point():
            x.requires_grad_()
            leaves.append(x)
        inp = x.transpose(0, 1) if cfg["batch_first"] else x
        if unbatched:
            inp = inp[0] if cfg["batch_first"] else inp[:, 0]
        if fault == "input_rank":
            inp = inp.unsqueeze(-1)
        if form.startswith("packed"):
            inp = pack_padded_sequence(inp, lengths, batch_first=cfg["batch_first"],
                                       enforce_sorted=form == "packed_sorted")
            inp = _tamper(inp, fault)
        if fault == "list_input":
            inp = [inp]
        hx = None
        if given_state:
            s_dtype = _other_float(dtype) if fault == "state_dtype" else dtype
            h = h0.to(s_dtype).requires_grad_()
            c = c0.to(s_dtype).requires_grad_()
            leaves += [h, c] if lstm else [h]
            if lstm:
                hx = {"state_count": (h,), "state_as_list": [h, c]}.get(fault, (h, c))
            else:
                hx = [h] if fault == "state_as_list" else h
        return inp, hx, leaves

    return build, unsafe, unchecked, ref_quirk


def _increasing(counts):
    """The counts made to increase somewhere, keeping their sum (unchanged for one step)."""
    if counts[0] != counts[-1]:
        return counts.flip(0)
    counts = counts.clone()
    if counts.numel() > 1:
        counts[0] -= 1
        counts[-1] += 1
    return counts


def _tamper(packed, fault):
    data, counts, sorted_idx, unsorted_idx = packed
    counts = {
        "counts_increasing": _increasing,
        "counts_sum_more": lambda c: c + (torch.arange(c.numel()) == 0).long(),
        "counts_sum_less": lambda c: c - (torch.arange(c.numel()) == c.numel() - 1).long() * (c[-1] > 0).long(),
        "counts_negative": lambda c: torch.cat([c, torch.tensor([-1])]),
        "counts_int32": lambda c: c.int(), "counts_float": lambda c: c.float(),
        "counts_2d": lambda c: c.unsqueeze(0), "counts_empty": lambda c: c[:0],
    }.get(fault, lambda c: c)(counts)
    if fault == "sorted_indices_short" and sorted_idx is not None:
        sorted_idx, unsorted_idx = sorted_idx[:-1], unsorted_idx[:-1]
    if fault == "sorted_indices_out_of_range" and sorted_idx is not None:
        sorted_idx = sorted_idx.clone()
        sorted_idx[0] = len(sorted_idx) + 3
    if fault == "noncontiguous_data":
        data = torch.cat([data, data], 1)[:, ::2]
    return PackedSequence(data, counts, sorted_idx, unsorted_idx)


def _cell_case(kind, dtype, cfg, fault, gen):
    lstm = kind == "LSTMCell"
    batched = cfg["form"] != "unbatched" or fault == "batched_input_1d_state"
    batch, hidden = cfg["batch"], cfg["hidden"]
    if fault == "batched_input_1d_state" and int(torch.randint(2, (1,), generator=gen)):
        hidden = batch  # torch.nn's other error: a 1-D state as long as the batch
    shape = (batch, cfg["input"]) if batched else (cfg["input"],)
    if fault == "feature_size":
        shape = shape[:-1] + (cfg["input"] + 1,)
    if fault == "input_rank":
        shape = (1, *shape) if batched else ()
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    if fault in ("nan", "inf") and x0.numel():
        x0.view(-1)[0] = float("nan") if fault == "nan" else float("inf")
    lead = (batch,) if batched and fault != "batched_input_1d_state" else ()
    if fault == "state_rank":
        lead = (1, batch) if batched else (1, 1, 1)
    if fault == "state_batch" and lead:
        lead = (batch + 1,)
    h_size = cfg["hidden"] + (1 if fault == "state_hidden" else 0)
    if fault == "batched_input_1d_state":
        h_size = hidden
    states0 = [torch.randn(*lead, h_size, generator=gen, dtype=torch.float64) for _ in range(2)]
    given_state = cfg["given_state"] or (fault or "").startswith(("state", "batched"))
    # (unbatched input with a 2-D state crashes torch.nn: never drawn here)

    def build():
        x = x0.to(_other_float(dtype) if fault == "input_dtype" else dtype).requires_grad_()
        leaves = [x]
        hx = None
        if given_state:
            s_dtype = _other_float(dtype) if fault == "state_dtype" else dtype
            states = [s.to(s_dtype).requires_grad_() for s in states0]
            if lstm:
                hx = (states[0],) if fault == "state_count" else tuple(states)
                leaves += list(hx)
            else:
                hx = states[0]
                leaves.append(hx)
        return x, hx, leaves

    return build, False, False, False


def _run(module, build, seed):
    """Outputs and gradients of one call, or the exception it raised."""
    try:
        inp, hx, leaves = build()
        torch.manual_seed(seed)  # the same dropout masks in both modules
        out = module(inp, hx)
        outs = []
        for o in (out if isinstance(out, tuple) else (out,)):
            if isinstance(o, PackedSequence):
                o = o.data
            outs += list(o) if isinstance(o, tuple) else [o]
        gen = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
                   for o in outs)
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()), allow_unused=True)
        return None, [o.detach() for o in outs] + list(grads)
    except Exception as exc:  # noqa: BLE001 (the class is what is compared)
        return exc, None


def _compare(kind, backend, dtype, cfg, fault, seed):
    gen = torch.Generator().manual_seed(seed)
    ref, fused = _construct(kind, dtype, backend, cfg)
    case = _cell_case if "Cell" in kind else _module_case
    build, unsafe, unchecked, ref_quirk = case(kind.split("_")[0], dtype, cfg, fault, gen)
    fused_exc, fused_vals = _run(fused, build, seed)
    ref_exc, ref_vals = (None, None) if unsafe else _run(ref, build, seed)
    if unsafe or (unchecked and ref_exc is None):
        # torch.nn does not check this input (and reads past it, or accepts what does not fit)
        assert isinstance(fused_exc, RuntimeError), f"accepted what torch.nn mishandles: {fused_exc!r}"
        return
    if ref_quirk and isinstance(ref_exc, RuntimeError) and fused_exc is None:
        return
    if ref_exc is not None or fused_exc is not None:
        assert type(fused_exc) is type(ref_exc), \
            f"torch.nn raised {ref_exc!r}, fusedrnn {fused_exc!r}"
        return
    assert len(ref_vals) == len(fused_vals)
    if dtype == torch.bfloat16:
        for i, (a, b) in enumerate(zip(fused_vals, ref_vals)):
            assert (a is None) == (b is None), f"tensor {i}: a gradient on one side only"
            if a is None:
                continue
            assert a.shape == b.shape and a.dtype == b.dtype, f"tensor {i}: {a.shape} {b.shape}"
        return
    rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (2e-4, 2e-5)
    for i, (a, b) in enumerate(zip(fused_vals, ref_vals)):
        if b is None:
            assert a is None or not a.any(), f"tensor {i}: torch.nn has no gradient"
            continue
        assert a is not None, f"tensor {i}: fusedrnn has no gradient"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"tensor {i}: {m}")


def _configs(kinds, faults, backend):
    no_proj = not takes_proj_size(backend)  # the persistent kernels
    return st.fixed_dictionaries(dict(
        kind=st.sampled_from(kinds), fault=st.sampled_from(faults),
        input=st.integers(1, 4), hidden=st.integers(1, 5), layers=st.integers(1, 3),
        bias=st.booleans(), batch_first=st.booleans(), bidirectional=st.booleans(),
        proj=st.just(0) if no_proj else st.sampled_from([0, 0, 1, 2]),
        dropout=st.sampled_from([0.0, 0.0, 0.3]), train=st.booleans(),
        form=st.sampled_from(["padded", "unbatched", "packed_sorted", "packed_unsorted"]),
        steps=st.integers(1, 5), batch=st.integers(1, 4), given_state=st.booleans(),
        seed=st.integers(0, 2**31 - 1)))


def _fuzz(backend, dtype, examples, kinds, faults):
    ran = []

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_configs(kinds, faults, backend))
    def check(cfg):
        if cfg["proj"] >= cfg["hidden"]:
            cfg = dict(cfg, proj=0)
        _compare(cfg["kind"], backend, dtype, cfg, cfg["fault"], cfg["seed"])
        ran.append(cfg["fault"])
    check()
    faulty = sum(f is not None for f in ran)
    print(f"\nfuzz {backend} {kinds[0]}...: {len(ran)} examples, {faulty} with a malformed input")


@pytest.mark.parametrize("backend,dtype,examples", [
    pytest.param(*b, id=b[0] + ("-bf16" if b[1] == torch.bfloat16 else ""),
                 marks=pytest.mark.skipif(not runs_on_cpu_tensors(b[0]), reason="unavailable"))
    for b in BACKENDS])
def test_fuzz_modules_against_torch_nn(backend, dtype, examples):
    _fuzz(backend, dtype, examples, MODULE_KINDS, MODULE_FAULTS)


@pytest.mark.parametrize("backend,dtype,examples", [
    pytest.param(*b, id=b[0] + ("-bf16" if b[1] == torch.bfloat16 else ""),
                 marks=pytest.mark.skipif(not runs_on_cpu_tensors(b[0]), reason="unavailable"))
    for b in BACKENDS])
def test_fuzz_cells_against_torch_nn(backend, dtype, examples):
    _fuzz(backend, dtype, examples, CELL_KINDS, CELL_FAULTS)
