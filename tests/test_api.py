"""fusedrnn's modules against torch.nn: every constructor option and input form."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from conftest import assert_close

MODULES = {"lstm": (nn.LSTM, fusedrnn.LSTM), "gru": (nn.GRU, fusedrnn.GRU),
           "rnn_tanh": (nn.RNN, fusedrnn.RNN), "rnn_relu": (nn.RNN, fusedrnn.RNN)}
FORMS = ["padded", "packed_sorted", "packed_unsorted", "unbatched"]

# A 2^(5-2) fractional factorial over the five binary options: every option takes both values
# and every pair of (bidirectional, batch_first, bias) meets in all four combinations.
DESIGN = [(a, b, c, a ^ b, a ^ c) for a, b, c in itertools.product((0, 1), repeat=3)]


def make_pair(cell, layers, bidirectional, batch_first, bias, proj, dtype, dropout=0.0, backend="auto"):
    torch_cls, fused_cls = MODULES[cell]
    kw = dict(num_layers=layers, bidirectional=bool(bidirectional), batch_first=bool(batch_first),
              bias=bool(bias), dropout=dropout)
    if cell.startswith("rnn"):
        kw["nonlinearity"] = cell[4:]
    if proj:
        kw["proj_size"] = proj
    input_size, hidden = 5, 6
    ref = torch_cls(input_size, hidden, **kw).to(dtype)
    for p in ref.parameters():  # draw fresh weights (default init is small and correlated)
        nn.init.uniform_(p, -0.6, 0.6)
    fused = fused_cls(input_size, hidden, backend=backend, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def make_input(rng, ref, form, dtype, given_states):
    steps, batch = rng.randint(1, 6), rng.randint(1, 4)
    directions = 2 if ref.bidirectional else 1
    out = ref.proj_size if getattr(ref, "proj_size", 0) else ref.hidden_size
    x = torch.randn(steps, batch, ref.input_size, dtype=dtype)
    if ref.batch_first:
        x = x.transpose(0, 1).contiguous()
    states = None
    if given_states:
        lead = (ref.num_layers * directions,) + ((batch,) if form != "unbatched" else ())
        h0 = torch.randn(*lead, out, dtype=dtype)
        states = (h0, torch.randn(*lead, ref.hidden_size, dtype=dtype)) if ref.mode == "LSTM" else h0
    if form == "unbatched":
        x = x[0] if ref.batch_first else x[:, 0]
    return x, states, steps, batch


def as_input(x, form, steps, batch, batch_first, rng):
    """The module input for a form; gradients flow back to the padded leaf ``x``."""
    if not form.startswith("packed"):
        return x
    lengths = [rng.randint(1, steps) for _ in range(batch)]
    lengths[rng.randrange(batch)] = steps
    if form == "packed_sorted":
        lengths.sort(reverse=True)
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                enforce_sorted=form == "packed_sorted")


def flat(output, hidden):
    if isinstance(output, nn.utils.rnn.PackedSequence):
        output = output.data
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return [output] + hidden


def run_and_grad(module, x, states, form, steps, batch, seed, upstream=None):
    import random
    x = x.detach().clone().requires_grad_()
    states = None if states is None else (
        tuple(s.detach().clone().requires_grad_() for s in states) if isinstance(states, tuple)
        else states.detach().clone().requires_grad_())
    inp = as_input(x, form, steps, batch, module.batch_first, random.Random(seed))
    outs = flat(*module(inp, states))
    if upstream is None:
        upstream = [torch.randn_like(o) for o in outs]
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    leaves = [x] + ([] if states is None else list(states) if isinstance(states, tuple) else [states])
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return outs, grads, upstream


def test_the_cpu_extension_is_built_and_loads():
    """The install builds fusedrnn._C. A build that fails to load (an undefined symbol, say) must
    fail the suite here, not quietly skip every test of the C++ kernels."""
    assert fusedrnn.backends()["cpu"] == "available", fusedrnn.backends()["cpu"]


# The module-level grid runs on the oracle and on every CPU kernel backend built here.
BACKENDS = [pytest.param("reference"), pytest.param("cpu", marks=pytest.mark.skipif(
    fusedrnn.backends()["cpu"] != "available", reason="fusedrnn._C not built"))]


def check_parity(rng, cell, form, variant, dtype, backend):
    bidirectional, batch_first, bias, given_states, use_proj = DESIGN[variant]
    layers = 1 + variant % 3
    proj = 3 if use_proj and cell == "lstm" else 0
    ref, fused = make_pair(cell, layers, bidirectional, batch_first, bias, proj, dtype,
                           backend=backend)
    x, states, steps, batch = make_input(rng, ref, form, dtype, given_states)
    seed = rng.randrange(2**31)
    ref_outs, ref_grads, upstream = run_and_grad(ref, x, states, form, steps, batch, seed)
    outs, grads, _ = run_and_grad(fused, x, states, form, steps, batch, seed, upstream)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert a.shape == b.shape
        assert_close(a, b, dtype, f"output {i}")
    names = ["input"] + ["state"] * (0 if states is None else len(states) if isinstance(states, tuple)
                                     else 1) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", range(len(DESIGN)))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cell", list(MODULES))
def test_parity_float64(rng, cell, form, variant, backend):
    check_parity(rng, cell, form, variant, torch.float64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [0, 3, 5, 6])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cell", list(MODULES))
def test_parity_float32(rng, cell, form, variant, backend):
    check_parity(rng, cell, form, variant, torch.float32, backend)


@pytest.mark.parametrize("cell", list(MODULES))
def test_output_types_and_shapes(cell):
    ref, fused = make_pair(cell, 2, True, True, True, 3 if cell == "lstm" else 0, torch.float32)
    x = torch.randn(3, 4, 5)  # batch_first: 3 sequences of 4 steps
    for a, b in [(ref(x), fused(x)), (ref(x[0]), fused(x[0]))]:
        assert type(a[1]) is type(b[1])
        for t, u in zip(flat(*a), flat(*b)):
            assert t.shape == u.shape and t.dtype == u.dtype
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 1]), batch_first=True)
    out, _ = fused(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    padded, lengths = pad_packed_sequence(out, batch_first=True)
    assert lengths.tolist() == [4, 2, 1] and padded.shape == ref(x)[0].shape


@pytest.mark.parametrize("cell", list(MODULES))
def test_inter_layer_dropout(rng, cell):
    """Training-mode dropout draws the same masks as torch.nn from the same RNG state."""
    ref, fused = make_pair(cell, 3, True, False, True, 0, torch.float64, dropout=0.4)
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    seed = rng.randrange(2**31)
    for train in (True, False):
        ref.train(train), fused.train(train)
        torch.manual_seed(seed)
        a = flat(*ref(x))
        torch.manual_seed(seed)
        b = flat(*fused(x))
        for t, u in zip(a, b):
            assert_close(u, t, torch.float64, f"train={train}")
    ref.train(True), fused.train(True)
    torch.manual_seed(seed)
    a = ref(x)[0]
    b = fused(x)[0]  # a different RNG state: different masks
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("fused_cls,torch_cls,kw", [
    (fusedrnn.LSTMCell, nn.LSTMCell, {}), (fusedrnn.GRUCell, nn.GRUCell, {}),
    (fusedrnn.RNNCell, nn.RNNCell, {"nonlinearity": "tanh"}),
    (fusedrnn.RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
    (fusedrnn.LSTMCell, nn.LSTMCell, {"bias": False}), (fusedrnn.GRUCell, nn.GRUCell, {"bias": False})])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("given_states", [True, False])
def test_cells(rng, fused_cls, torch_cls, kw, batched, given_states):
    ref = torch_cls(4, 5, **kw).double()
    for p in ref.parameters():
        nn.init.uniform_(p, -0.6, 0.6)
    fused = fused_cls(4, 5, **kw).double()
    fused.load_state_dict(ref.state_dict())
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 4, dtype=torch.float64, requires_grad=True)
    states = None
    if given_states:
        n = 2 if torch_cls is nn.LSTMCell else 1
        states = tuple(torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True) for _ in range(n))
        states = states if n == 2 else states[0]
    a, b = ref(x, states), fused(x, states)
    a, b = (list(a), list(b)) if isinstance(a, tuple) else ([a], [b])
    upstream = [torch.randn_like(t) for t in a]
    leaves = [x] + ([] if states is None else list(states) if isinstance(states, tuple) else [states])
    ga = torch.autograd.grad(sum((t * u).sum() for t, u in zip(a, upstream)), leaves + list(ref.parameters()))
    gb = torch.autograd.grad(sum((t * u).sum() for t, u in zip(b, upstream)), leaves + list(fused.parameters()))
    for t, u in zip(a + list(ga), b + list(gb)):
        assert t.shape == u.shape
        assert_close(u, t, torch.float64)


@pytest.mark.parametrize("cell", list(MODULES))
def test_state_dict_round_trip(cell):
    kw = dict(num_layers=2, bidirectional=True)
    if cell == "lstm":
        kw["proj_size"] = 2
    if cell.startswith("rnn"):
        kw["nonlinearity"] = cell[4:]
    torch_cls, fused_cls = MODULES[cell]
    ref, fused = torch_cls(3, 4, **kw), fused_cls(3, 4, **kw)
    assert list(ref.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(ref.state_dict())
    back = torch_cls(3, 4, **kw)
    back.load_state_dict(fused.state_dict())
    for (n, p), (m, q) in zip(ref.named_parameters(), back.named_parameters()):
        assert n == m and torch.equal(p, q)
    assert isinstance(fused, torch_cls)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True)
        self.gru = nn.GRU(5, 5, bidirectional=True)
        self.cell = nn.RNNCell(10, 3)

    def forward(self, x):
        y, _ = self.lstm(self.encoder(x))
        y, _ = self.gru(y.transpose(0, 1))
        return self.cell(y[-1])


def test_convert_keeps_outputs_and_parameters():
    model = Tagger().double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    expected = model(x)
    params = list(model.parameters())
    converted = fusedrnn.convert(copy.deepcopy(model))
    assert type(converted.lstm) is fusedrnn.LSTM and type(converted.gru) is fusedrnn.GRU
    assert type(converted.cell) is fusedrnn.RNNCell
    assert_close(converted(x), expected, torch.float64)
    shared = fusedrnn.convert(model)  # in place: the very same Parameter objects
    assert [id(p) for p in shared.parameters()] == [id(p) for p in params]
    original = nn.LSTM(2, 3)
    converted = fusedrnn.convert(original)
    assert isinstance(converted, fusedrnn.LSTM)
    converted.register_forward_hook(lambda *args: None)  # its own module state, shared weights
    assert not original._forward_hooks
    assert converted.weight_hh_l0 is original.weight_hh_l0


def test_convert_keeps_a_shared_module_shared():
    rnn = nn.GRU(3, 4)
    model = nn.ModuleDict({"encoder": rnn, "decoder": rnn, "inner": nn.Sequential(rnn)})
    converted = fusedrnn.convert(model)
    assert type(converted["encoder"]) is fusedrnn.GRU
    assert converted["decoder"] is converted["encoder"] is converted["inner"][0]
    assert list(converted.state_dict()) == list(model.state_dict())


def _parametrize(module, how):
    """One weight of ``module`` parametrized the ways torch.nn offers."""
    if how == "hooks_weight_norm":  # the deprecated hook-based one, still used
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(module, "weight_hh_l1")
    elif how == "prune":  # hook-based too: weight_ih_l0 = weight_ih_l0_orig * mask
        prune.l1_unstructured(module, "weight_ih_l0", amount=0.4)
    else:
        getattr(nn.utils.parametrizations, how)(module, "weight_hh_l0")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("how", ["orthogonal", "weight_norm", "spectral_norm",
                                 "hooks_weight_norm", "prune"])
def test_parametrized_weights(rng, cell, how):
    """A parametrized or pruned weight is not a Parameter of the module: it is computed on
    access (and once raised AttributeError here). Values and every gradient equal torch.nn's,
    also after convert, which keeps the parametrization (and its Parameters) shared."""
    ref, fused = make_pair(cell, 2, False, False, True, 0, torch.float64)
    for module in (ref, fused):
        _parametrize(module, how)
    fused.load_state_dict(ref.state_dict())
    converted = fusedrnn.convert(ref)  # (torch cannot deepcopy a hook-based weight_norm)
    assert isinstance(converted, MODULES[cell][1])
    if how not in ("hooks_weight_norm", "prune"):
        assert nn.utils.parametrize.is_parametrized(converted, "weight_hh_l0")
    x = torch.randn(rng.randint(2, 5), 3, 5, dtype=torch.float64)
    for module in (ref, fused, converted):
        module.eval()  # (spectral_norm's power iteration then stays put)
    outputs = []
    for module in (ref, fused, converted):
        y, _ = module(x)
        grads = torch.autograd.grad(y.pow(2).sum(), list(module.parameters()))
        outputs.append((y, grads))
    for y, grads in outputs[1:]:
        assert_close(y, outputs[0][0], torch.float64)
        for got, want in zip(grads, outputs[0][1]):
            assert_close(got, want, torch.float64)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_trace_and_script(rng):
    """TorchScript cannot compile fusedrnn's forward nor record its ops, so torch.jit.trace
    records torch.nn's forward on the same weights (its aten op: the trace runs at other
    shapes) and torch.jit.script compiles the torch.nn twin (it once failed on both)."""
    model = Tagger().double()
    fused = fusedrnn.convert(copy.deepcopy(model))
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    other = torch.randn(rng.randint(1, 4), rng.randint(7, 9), 3, dtype=torch.float64)
    traced = torch.jit.trace(fused, (x,))
    assert_close(traced(other), model(other), torch.float64)
    assert type(fused.lstm) is fusedrnn.LSTM
    with pytest.warns(UserWarning, match="compiled as torch.nn's"):
        scripted = torch.jit.script(fused)
    assert_close(scripted(other), model(other), torch.float64)
    assert_close(fused(other), model(other), torch.float64)  # (torch.jit swapped the twins in)


# --- bad input: the same error types torch.nn raises ---

def _both(cell):
    return make_pair(cell, 2, False, False, True, 0, torch.float32)


@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("case,error", [
    ("feature_size", RuntimeError), ("rank", ValueError), ("state_shape", RuntimeError),
    ("state_rank", RuntimeError), ("dtype", ValueError)])
def test_bad_input_raises_like_torch(cell, case, error):
    ref, fused = _both(cell)
    is_lstm = cell == "lstm"
    x = torch.randn(4, 3, 5)
    hx = None
    if case == "feature_size":
        x = torch.randn(4, 3, 7)
    elif case == "rank":
        x = torch.randn(4, 3, 5, 1)
    elif case == "state_shape":
        h = torch.randn(2, 2, 6)
        hx = (h, torch.randn(2, 3, 6)) if is_lstm else h
    elif case == "state_rank":
        h = torch.randn(3, 6)
        hx = (h, h) if is_lstm else h
    elif case == "dtype":
        x = x.double()
    for module in (ref, fused):
        with pytest.raises(error):
            module(x, hx)


def test_bad_state_dtype_and_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        fusedrnn.LSTM(3, 4, backend="nope")
    x, h = torch.randn(2, 1, 3), torch.randn(1, 1, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # torch.nn: "mat1 and mat2 must have the same dtype"
        nn.GRU(3, 4)(x, h)
    with pytest.raises(RuntimeError, match="dtype"):
        fusedrnn.GRU(3, 4)(x, h)


def test_device_mismatch_is_clear():
    lstm = fusedrnn.LSTM(3, 4).to("meta")
    with pytest.raises(RuntimeError, match="same device"):
        lstm(torch.randn(2, 1, 3))


@pytest.mark.parametrize("case", ["feature_size", "rank", "state_shape", "dtype", "state_count"])
def test_bad_cell_input(case):
    ref, fused = nn.LSTMCell(3, 4), fusedrnn.LSTMCell(3, 4)
    x, hx = torch.randn(2, 3), None
    if case == "feature_size":
        x = torch.randn(2, 5)
    elif case == "rank":
        x = torch.randn(2, 3, 1)
    elif case == "state_shape":
        hx = (torch.randn(3, 4), torch.randn(3, 4))
    elif case == "dtype":
        x = x.double()
    elif case == "state_count":
        hx = (torch.randn(2, 4),) * 3
    with pytest.raises((RuntimeError, ValueError)) as expected:
        ref(x, hx)
    with pytest.raises(expected.type):
        fused(x, hx)


class _Missing(fusedrnn.backend.base.Backend):
    name = "missing"

    def unavailable_reason(self):
        return "the widget is not installed"


def test_backends_report_and_explicit_unavailable(monkeypatch):
    from fusedrnn import dispatch
    monkeypatch.setitem(dispatch._REGISTRY, "missing", _Missing())
    monkeypatch.setitem(dispatch._AUTO_ORDER, "cpu", ["missing", *dispatch._AUTO_ORDER["cpu"]])
    monkeypatch.setattr(dispatch, "_chosen", {})  # the choices made under the real registry
    status = fusedrnn.backends()
    assert status["reference"] == "available"
    assert status["missing"] == "unavailable: the widget is not installed"
    x = torch.randn(3, 2, 3)
    with pytest.raises(fusedrnn.BackendUnavailableError, match="widget"):
        fusedrnn.LSTM(3, 4, backend="missing")(x)
    out, _ = fusedrnn.LSTM(3, 4, backend="auto")(x)  # auto falls back past it
    assert out.shape == (3, 2, 4)


def test_packed_state_with_wrong_batch_is_a_clear_error():
    lstm = fusedrnn.LSTM(3, 4)
    x = torch.randn(5, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    h = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        lstm(packed, (h, h))


@pytest.mark.parametrize("cell", list(MODULES))
def test_module_gradcheck(cell):
    _, fused = make_pair(cell, 2, True, False, True, 2 if cell == "lstm" else 0, torch.float64)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: fused(inp)[0], (x,))


@pytest.mark.parametrize("cell", list(MODULES))
def test_empty_batch_and_empty_sequence(cell):
    ref, fused = make_pair(cell, 2, True, False, True, 0, torch.float32)
    empty_batch = torch.randn(3, 0, 5)
    for a, b in zip(flat(*ref(empty_batch)), flat(*fused(empty_batch))):
        assert a.shape == b.shape
    for module in (ref, fused):
        with pytest.raises(RuntimeError, match="sequence length"):
            module(torch.randn(0, 2, 5))


def test_resolved_backend_says_what_runs():
    assert fusedrnn.resolved_backend(fusedrnn.GRU(3, 4, backend="reference")) == "reference"
    expected = "cpu" if fusedrnn.backends()["cpu"] == "available" else "reference"
    lstm = fusedrnn.LSTM(3, 4, num_layers=2)
    assert fusedrnn.resolved_backend(lstm, torch.randn(5, 2, 3)) == expected
    assert fusedrnn.resolved_backend(fusedrnn.RNNCell(3, 4), torch.randn(2, 3)) == expected
    # float16 on the CPU: no kernel backend takes it, auto falls back to the reference
    assert fusedrnn.resolved_backend(lstm, torch.randn(5, 2, 3).half()) == "reference"
    with pytest.raises(fusedrnn.BackendUnavailableError, match="float16"):
        fusedrnn.resolved_backend(fusedrnn.LSTM(3, 4, backend="cpu"), torch.randn(5, 2, 3).half())
    with pytest.raises(TypeError, match="not a fusedrnn module"):
        fusedrnn.resolved_backend(nn.LSTM(3, 4))


def test_the_backend_is_chosen_once_per_configuration(monkeypatch):
    """dispatch asks the backends once per (name, layer spec), not at every layer and call."""
    from fusedrnn import dispatch
    from fusedrnn.backend.reference import BACKEND as REFERENCE
    monkeypatch.setattr(dispatch, "_chosen", {})
    asked = []
    original = REFERENCE.unsupported_reason
    monkeypatch.setattr(REFERENCE, "unsupported_reason",
                        lambda spec: asked.append(spec) or original(spec))
    model = fusedrnn.GRU(3, 4, num_layers=3, bidirectional=True, backend="reference")
    for _ in range(3):
        model(torch.randn(5, 2, 3))
    assert len(asked) == 1
    model.double()(torch.randn(5, 2, 3, dtype=torch.float64))  # a new dtype: a new choice
    assert len(asked) == 2
