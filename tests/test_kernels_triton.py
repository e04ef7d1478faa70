"""The Triton kernels, run in Triton's interpreter on CPU tensors, against the reference.

Every kernel (per-step pointwise and persistent, forward and backward) for every cell is
compared through ``check_sequence`` (outputs, final states and every gradient) on fresh
random inputs. conftest.py sets TRITON_INTERPRET=1 before anything imports Triton.
The compile checks at the end build the same kernels for sm_80 and sm_90 (no GPU needed).
"""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytest.importorskip("triton")

import fusedrnn  # noqa: E402
from fusedrnn import dispatch  # noqa: E402
from fusedrnn.backend import triton as triton_backend  # noqa: E402
from fusedrnn.backend.base import LayerSpec  # noqa: E402
from fusedrnn.cells import CELLS  # noqa: E402
from sequence_check import check_sequence, random_batch_sizes  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the kernels in Triton's interpreter")

PATHS = [triton_backend.PERSISTENT, triton_backend.ALTERNATING]
PATH_IDS = ["persistent", "alternating"]
CELL_NAMES = list(CELLS)
# Normwise (rtol, atol) for 16-bit storage, vs a float64 reference from the same rounded
# inputs. h is rounded to 16 bits every step, as torch.nn does in these dtypes; measured
# worst cases over 6 seeds x 2 paths x 4 cells: fp16 5e-3, bf16 2e-2 (relative).
LOW_PRECISION_TOL = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (6e-2, 1e-2)}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_fp32_packed(path, cell, reverse, rng):
    # hidden 20 is no power of two; 18 rows fill one 16-row tile and part of a second.
    # scale 0.3 keeps the recurrence near-contractive: at 0.5, fp32 rounding grown over the
    # steps exceeds 1e-5 against float64 in some RNN draws, for torch's own fp32 too (the
    # reference backend run in fp32 failed 9 of 120 RNN draws at 0.5, none at 0.3)
    check_sequence(path, cell, random_batch_sizes(rng, 5, 18, packed=True), 20,
                   reverse=reverse, dtype=torch.float32, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_low_precision(path, cell, dtype, rng):
    # relu's derivative jumps at 0, where 16-bit rounding of a pre-activation can flip
    # its sign against float64; its backward is the fp32-tested code with 16-bit loads and
    # stores, which the other cells exercise here.
    check_sequence(path, cell, random_batch_sizes(rng, 6, 18, packed=True), 24,
                   reverse=rng.random() < 0.5, dtype=dtype, scale=0.3,
                   tol=LOW_PRECISION_TOL[dtype], check_grads=cell != "rnn_relu")


@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_one_step_small_batch_no_bias(path, cell, rng):
    check_sequence(path, cell, random_batch_sizes(rng, 1, 3, packed=False), 17, bias=False,
                   reverse=rng.random() < 0.5, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lstm_proj_alternating(dtype, rng):
    tol = LOW_PRECISION_TOL.get(dtype)
    check_sequence(triton_backend.ALTERNATING, "lstm", random_batch_sizes(rng, 5, 6, True), 20,
                   proj=12, reverse=rng.random() < 0.5, dtype=dtype, scale=0.3, tol=tol)


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_alternating_several_column_tiles(cell, rng):
    # hidden 72 spans two 64-wide tiles of the pointwise kernels
    check_sequence(triton_backend.ALTERNATING, cell, random_batch_sizes(rng, 3, 5, True), 72,
                   reverse=rng.random() < 0.5, dtype=torch.float32, scale=0.2)


def test_persistent_padded_hidden(rng):
    # hidden 40 is padded to 64-wide on-chip tiles
    check_sequence(triton_backend.PERSISTENT, "lstm", random_batch_sizes(rng, 3, 20, True), 40,
                   reverse=rng.random() < 0.5, dtype=torch.float32, scale=0.3)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_inference_skips_saving(path, rng):
    """Without grad the forward writes no backward buffers; outputs must not change."""
    from fusedrnn.backend.reference import BACKEND as reference
    from sequence_check import run_sequence, sequence_inputs
    for cell, proj in (("lstm", 6 if path is triton_backend.ALTERNATING else 0), ("gru", 0)):
        args = sequence_inputs(CELLS[cell], random_batch_sizes(rng, 4, 5, True), 10, proj,
                               dtype=torch.float32)
        calls = []
        forward_loop = path.forward_loop
        def recording_loop(*a):  # noqa: E306
            calls.append(a[-1])  # the ``save`` flag
            return forward_loop(*a)
        path.forward_loop = recording_loop
        try:
            with torch.no_grad():
                ours = run_sequence(path, CELLS[cell], args, reverse=True)
        finally:
            del path.forward_loop
        assert calls == [False]
        with torch.no_grad():
            ref = run_sequence(reference, CELLS[cell], args, reverse=True)
        for a, b in zip(ours, ref):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _lengths(rng, steps, batch):
    return sorted([steps] + [rng.randint(1, steps) for _ in range(batch - 1)], reverse=True)


@pytest.mark.parametrize("given_states", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("mode, proj", [("LSTM", 0), ("GRU", 0), ("LSTM", 7)],
                         ids=["LSTM", "GRU", "LSTM-proj"])
def test_module_matches_torch_nn(mode, proj, given_states, rng):
    """fusedrnn.LSTM/GRU(backend="triton") on CPU tensors vs torch.nn: packed, 2 layers,
    bidirectional, batch_first (proj_size runs on the alternating path); outputs, states
    and all gradients at fp32 tolerance."""
    kwargs = dict(input_size=5, hidden_size=12, num_layers=2, bidirectional=True,
                  batch_first=True, **({"proj_size": proj} if proj else {}))
    ours = getattr(fusedrnn, mode)(**kwargs, backend="triton")
    ref = getattr(nn, mode)(**kwargs)
    ref.load_state_dict(ours.state_dict())
    batch, steps = 4, 5
    lengths = _lengths(rng, steps, batch)
    x = torch.randn(batch, steps, 5)
    hx = None
    if given_states:
        h0 = torch.randn(4, batch, proj or 12)
        hx = (h0, torch.randn(4, batch, 12)) if mode == "LSTM" else h0

    def run(model):
        inp = x.clone().requires_grad_()
        packed = pack_padded_sequence(inp, lengths, batch_first=True)
        out, state = model(packed, hx)
        y, _ = pad_packed_sequence(out, batch_first=True)
        states = state if isinstance(state, tuple) else (state,)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() \
            + sum((s * 0.5).sum() for s in states)
        grads = torch.autograd.grad(loss, [inp, *model.parameters()])
        return [y, *states, *grads]

    for a, b in zip(run(ours), run(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_names_and_fallback(caplog):
    cpu, lstm = torch.device("cpu"), CELLS["lstm"]
    spec = lambda dtype, hidden, proj=0: LayerSpec(cpu, dtype, lstm, hidden, proj)  # noqa: E731
    assert dispatch.select("triton", spec(torch.float32, 20)) is triton_backend.PERSISTENT
    assert dispatch.select("triton:alternating", spec(torch.float16, 20)) \
        is triton_backend.ALTERNATING
    # the CPU auto order never picks the (slow) interpreter
    assert dispatch.select("auto", spec(torch.float32, 20)).name == dispatch._AUTO_ORDER["cpu"][0]
    with caplog.at_level(logging.DEBUG, logger="fusedrnn"):
        assert dispatch.select("triton", spec(torch.float32, 512)) is triton_backend.ALTERNATING
        assert dispatch.select("triton", spec(torch.float32, 20, 8)) is triton_backend.ALTERNATING
    assert "on-chip budget" in caplog.text and "proj_size" in caplog.text
    with pytest.raises(dispatch.BackendUnavailableError, match="float64"):
        dispatch.select("triton", spec(torch.float64, 20))
    assert fusedrnn.backends()["triton:persistent"] == "available"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = dispatch.reason("triton:persistent",
                             LayerSpec(torch.device("cpu"), torch.float32, CELLS["gru"], 20))
    assert reason is not None and "TRITON_INTERPRET" in reason


def test_import_does_not_load_triton():
    code = ("import sys, fusedrnn; fusedrnn.backends(); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_interpret_set_after_importing_triton_is_reported():
    """Triton fixes each @jit function's mode when its module is imported: set after
    `import triton`, TRITON_INTERPRET cannot work, and backends() and the error say so
    (it used to say "available" and fail inside the interpreter)."""
    code = ("import os, torch, triton; os.environ['TRITON_INTERPRET'] = '1'; import fusedrnn\n"
            "status = fusedrnn.backends()['triton:persistent']\n"
            "assert 'before the first `import triton`' in status, status\n"
            "try:\n"
            "    fusedrnn.GRU(3, 4, backend='triton')(torch.randn(2, 1, 3))\n"
            "except fusedrnn.BackendUnavailableError as exc:\n"
            "    assert 'after triton was imported' in str(exc), exc\n"
            "else:\n"
            "    raise AssertionError('no error')\n"
            "assert fusedrnn.GRU(3, 4)(torch.randn(2, 1, 3))[0].shape == (2, 1, 4)  # auto\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_kernels_compile_for_sm80_and_sm90():
    """Each kernel compiles with Triton's real compiler for sm_80 and sm_90 at the largest
    persistent tiles the on-chip budget admits (and the per-step kernels), within the
    per-block shared-memory limit, without local memory, and without spill stack except
    where fusedrnn/kernels/README.md documents it (bench/compile_report.py). Runs in a
    subprocess without TRITON_INTERPRET
    (a compiler crash would abort the process)."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench)
    try:
        from compile_report import DEFAULT_CONFIGS, SHARED_LIMIT
    finally:
        sys.path.remove(bench)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(bench, "compile_report.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(DEFAULT_CONFIGS)
    known_stack = {("sequence_bwd", 90, "rnn_tanh", "fp32")}  # tf32x3 W split; see README
    for r in reports:
        what = f"{r}"
        assert r["local"] == 0 and r["reg"] <= 255, what
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], what
        if (r["kernel"], r["arch"], r["cell"], r["dtype"]) not in known_stack:
            assert r["stack"] == 0, what
