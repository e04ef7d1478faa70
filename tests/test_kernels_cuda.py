"""The CUDA C++ kernels (csrc/cuda), run by the CPU emulation of CUDA's execution model.

conftest.py sets FUSEDRNN_CUDA_EMULATE=1: ``cuda:pointwise`` and ``cuda:persistent`` then run
the same kernel source, built with g++, on CPU threads over CPU tensors. Each is compared with
the reference on fresh random inputs (float64 at 1e-10, float32 at 1e-5), by gradcheck, on
packed, reverse and bidirectional layers, and split over several blocks. The emulator is
checked on its own, and a persistent run under ThreadSanitizer is race-free while a
deliberately dropped grid barrier is caught. The nvcc checks compile every kernel for sm_80
and sm_90 and hold registers, spills, stack and shared memory to the limits.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import dispatch
from fusedrnn.backend import cuda, cuda_library
from fusedrnn.backend.base import LayerSpec
from fusedrnn.cells import CELLS
from conftest import assert_close, runs_on_cpu_tensors
from sequence_check import check_sequence, gradcheck_sequence, random_batch_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
PATHS = [cuda.POINTWISE, cuda.PERSISTENT]
PATH_IDS = ["pointwise", "persistent"]
CELL_NAMES = list(CELLS)

emulated = pytest.mark.skipif(not cuda_library.emulating(),
                              reason="runs the kernels in the CPU emulation")


@pytest.fixture
def sms(monkeypatch):
    """Sets how many blocks the emulated device holds at once (the persistent grid's limit)."""
    def set_sms(n):
        monkeypatch.setenv("FUSEDRNN_CUDA_EMULATE_SMS", str(n))
        cuda.PERSISTENT._plan.cache_clear()
    yield set_sms
    monkeypatch.delenv("FUSEDRNN_CUDA_EMULATE_SMS", raising=False)
    cuda.PERSISTENT._plan.cache_clear()


@emulated
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_packed_matches_reference(path, cell, reverse, dtype, rng):
    # hidden 20 over the default 4 emulated blocks: 5 units each
    check_sequence(path, cell, random_batch_sizes(rng, 5, 7, packed=True), 20, reverse=reverse,
                   dtype=dtype, scale=0.3 if dtype == torch.float32 else 0.5)


# Normwise (rtol, atol) for 16-bit storage against float64 from the same rounded inputs (h is
# rounded to 16 bits every step, as torch.nn does): the Triton tests' bounds.
LOW_PRECISION_TOL = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (6e-2, 1e-2)}


@emulated
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_low_precision(path, cell, dtype, rng):
    """16-bit storage, fp32 math and state: the emulation's half (IEEE binary16) and bfloat16
    (round to nearest even) have torch's layouts. relu's gradients are left out: its
    derivative jumps at 0, where 16-bit rounding can flip a pre-activation's sign."""
    check_sequence(path, cell, random_batch_sizes(rng, 6, 9, packed=True), 24,
                   reverse=rng.random() < 0.5, dtype=dtype, scale=0.3,
                   tol=LOW_PRECISION_TOL[dtype], check_grads=cell != "rnn_relu")


@emulated
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_padded_no_bias_one_step(path, cell, rng):
    check_sequence(path, cell, random_batch_sizes(rng, 1, 3, packed=False), 17, bias=False,
                   reverse=rng.random() < 0.5)


@emulated
@pytest.mark.parametrize("blocks,hidden", [(1, 48), (3, 10), (7, 20), (6, 6)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_persistent_block_splits(sms, blocks, hidden, cell, rng):
    """One block holding every unit (48: its pre-activations take 16 KiB per 16 rows in
    float64, so the 40 rows of a step run in three rounds); uneven splits (the last block has
    fewer units); one unit per block."""
    sms(blocks)
    units, grid = cuda.PERSISTENT.plan(cell, torch.float64, hidden)
    assert grid <= blocks and units * grid >= hidden > units * (grid - 1)
    check_sequence(cuda.PERSISTENT, cell, random_batch_sizes(rng, 4, 40, packed=True), hidden,
                   reverse=rng.random() < 0.5)


@emulated
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_wider_than_the_emulated_grid(sms, path, rng):
    """More (row, unit) elements than the emulated pointwise grid has threads (4 blocks of 64:
    the kernels loop grid-stride), and more blocks asked for than the emulation's thread cap
    allows (the plan keeps within it): both run, and match the reference."""
    sms(1000)
    check_sequence(path, "gru", random_batch_sizes(rng, 3, 40, packed=True), 70,
                   reverse=rng.random() < 0.5, scale=0.2)


def test_emulator_refuses_a_launch_over_its_thread_cap(tmp_path):
    """A launch over the emulation's thread cap is refused before any thread starts (a thread
    failing to start midway would leave the others waiting at barriers: a hang or an abort)."""
    src = tmp_path / "cap.cpp"
    src.write_text('#include "cuda/emulate/emulate.h"\n#include <cstdio>\n'
                   "struct A {};\nvoid k(A) {}\n"
                   "int main() { try { fusedrnn::emulate::launch(k, 5000u, 32u, 0, A{}); }\n"
                   '  catch (const std::exception& e) { std::puts(e.what()); return 3; }\n'
                   "  return 0; }\n")
    exe = str(tmp_path / "cap")
    subprocess.run(["g++", "-std=c++20", "-pthread", "-I", CSRC, str(src), "-o", exe],
                   check=True, capture_output=True)
    result = subprocess.run([exe], capture_output=True, text=True)
    assert result.returncode == 3 and "over the emulation's 4096" in result.stdout


@emulated
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_gradcheck(path, cell, rng):
    # fast mode (random directions): each emulated launch starts a few hundred threads, and
    # the full Jacobian took 30 s; check_sequence compares every gradient at 1e-10 anyway
    assert gradcheck_sequence(path, rng, cell, reverse=rng.random() < 0.5,
                              proj=path is cuda.POINTWISE, fast_mode=True)


@emulated
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pointwise_lstm_proj(dtype, rng):
    check_sequence(cuda.POINTWISE, "lstm", random_batch_sizes(rng, 5, 6, True), 12, proj=7,
                   reverse=rng.random() < 0.5, dtype=dtype, scale=0.3)


@emulated
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", ["cuda:persistent", "cuda:pointwise"])
def test_module_matches_torch_nn(backend, kind, rng):
    """Two bidirectional layers on a packed batch, through the module, against torch.nn in
    float64: outputs, final states and every parameter's gradient."""
    torch_layer = getattr(nn, kind)(5, 9, num_layers=2, bidirectional=True).double()
    ours = getattr(fusedrnn, kind)(5, 9, num_layers=2, bidirectional=True,
                                   backend=backend).double()
    ours.load_state_dict(torch_layer.state_dict())
    lengths = sorted([rng.randint(1, 6) for _ in range(4)], reverse=True)
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    outs = []
    for layer in (torch_layer, ours):
        packed = pack_padded_sequence(x, lengths)
        y, state = layer(packed)
        y, _ = pad_packed_sequence(y)
        states = state if isinstance(state, tuple) else (state,)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y).double()).sum() \
            + sum((s ** 2).sum() for s in states)
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        outs.append([y, *states, *grads])
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["cuda:persistent", "cuda:pointwise", "triton:persistent",
                                     "triton:alternating"])
def test_torch_compile(backend, rng):
    """A compiled two-layer LSTM runs its GPU-family layers outside the graph and matches
    torch.nn, gradient included (tracing into the ctypes calls once crashed the process;
    into Triton's interpreter, it raised)."""
    if not runs_on_cpu_tensors(backend):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    dtype = torch.float64 if backend.startswith("cuda") else torch.float32
    ours = fusedrnn.LSTM(5, 8, 2, backend=backend).to(dtype)
    ref = nn.LSTM(5, 8, 2).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5, dtype=dtype, requires_grad=True)
    results = []
    for layer in (torch.compile(ours), ref):
        y, (h, c) = layer(x)
        results.append([y, h, c, torch.autograd.grad(y.sum() + (h * c).sum(), x)[0]])
    for a, b in zip(*results):
        assert_close(a, b, dtype)


@emulated
def test_cuda_cells_match_the_registry():
    """The CUDA build lists csrc/cells/cells.h's cells, each with the registry's traits."""
    from fusedrnn.cells import built_cell_reason
    library = cuda_library.load()[0]
    assert sorted(library.cells) == sorted(CELLS)
    for name in library.cells:
        assert built_cell_reason(CELLS[name], library.cell_traits(name), "CUDA") is None, name
    assert library.cell_traits("lstm2") is None


@emulated
def test_refusals_say_why():
    lib_spec = dict(device=torch.device("cpu"), cell=CELLS["lstm"], hidden_size=8)
    complex64 = LayerSpec(dtype=torch.complex64, **lib_spec)
    assert "bfloat16" in dispatch.reason("cuda:pointwise", complex64)
    proj = LayerSpec(dtype=torch.float32, proj_size=4, **lib_spec)
    assert "proj_size" in dispatch.reason("cuda:persistent", proj)
    assert dispatch.reason("cuda:pointwise", proj) is None
    meta = LayerSpec(torch.device("meta"), torch.float32, CELLS["gru"], 8)
    assert "cpu tensors" in dispatch.reason("cuda:persistent", meta)
    layer = fusedrnn.LSTM(3, 8, proj_size=4, backend="cuda:persistent")
    with pytest.raises(fusedrnn.BackendUnavailableError, match="proj_size"):
        layer(torch.randn(2, 1, 3))


def test_unavailable_without_emulation_or_gpu(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CUDA_EMULATE", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert "FUSEDRNN_CUDA_EMULATE=1" in fusedrnn.backends()["cuda:persistent"]
    spec = LayerSpec(torch.device("cpu"), torch.float32, CELLS["gru"], 8)
    assert dispatch.reason("cuda:pointwise", spec) is not None


# ---- the emulator on its own, and races ----

def _build_checks(tmp_path, *flags):
    exe = str(tmp_path / "emulation_checks")
    subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-pthread", "-DFUSEDRNN_CUDA_EMULATE",
                    "-I", CSRC, *flags, os.path.join(ROOT, "tests", "cuda",
                                                     "emulation_checks.cpp"), "-o", exe],
                   check=True, capture_output=True, text=True)
    return exe


def _run(exe, what, **env):
    return subprocess.run([exe, what], capture_output=True, text=True,
                          env={**os.environ, "TSAN_OPTIONS": "exitcode=66", **env})


@pytest.mark.parametrize("what", ["barrier", "shuffle"])
def test_emulator(tmp_path, what):
    """Block and grid barriers order writes before reads; a warp sum by shuffles is exact in
    every warp; with the grid barrier dropped, the barrier check sees the disorder."""
    exe = _build_checks(tmp_path)
    result = _run(exe, what)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout
    if what == "barrier":
        broken = _run(exe, what, FUSEDRNN_EMULATE_DROP_GRID_SYNC="1")
        assert broken.returncode == 1 and "ordering errors" in broken.stdout


def test_persistent_race_free_under_tsan(tmp_path):
    """ThreadSanitizer sees no data race in a persistent LSTM and GRU forward and backward; with
    the grid barrier dropped it reports the race on the shared h buffer, and the result
    changes."""
    try:
        exe = _build_checks(tmp_path, "-fsanitize=thread")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no ThreadSanitizer here: {exc.stderr[-300:]}")
    clean = _run(exe, "persistent")
    assert clean.returncode == 0 and "ThreadSanitizer" not in clean.stderr, clean.stderr[-2000:]
    broken = _run(exe, "persistent", FUSEDRNN_EMULATE_DROP_GRID_SYNC="1")
    assert broken.returncode == 66 and "data race" in broken.stderr
    assert "persistent_forward" in broken.stderr
    checksum = re.compile(r"checksum (\S+)")
    assert checksum.search(clean.stdout).group(1) != checksum.search(broken.stdout).group(1)


# ---- nvcc: every kernel compiles for sm_80 and sm_90 within the resource limits ----

NVCC = cuda_library._nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
# (registers per thread at 256 threads, shared bytes per block (opt-in), SMs) per arch
LIMITS = {80: (255, 163 * 1024, 108), 90: (255, 227 * 1024, 132)}


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_nvcc_resources(tmp_path, arch):
    """ptxas -v for every instantiation: no spills, no stack, registers that let 256 threads
    run; no static shared memory (the persistent kernels' dynamic size is checked below)."""
    out = str(tmp_path / "lib.so")
    cmd = [NVCC, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
           "-I", CSRC, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
           cuda_library.SOURCE, "-o", out]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_\d+'\s*\n"
                         r"ptxas info\s*: Function properties for \w+\s*\n\s*"
                         r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                         r"loads\s*\nptxas info\s*: Used (\d+) registers(.*)", log)
    kernels = 4 * len(CELL_NAMES) * 4  # kernels x cells x dtypes
    assert len(entries) == kernels, log[-3000:]
    for name, stack, spill_st, spill_ld, regs, rest in entries:
        assert (int(stack), int(spill_st), int(spill_ld)) == (0, 0, 0), (name, stack, spill_st)
        assert int(regs) <= LIMITS[arch][0] and int(regs) * 256 <= 65536, (name, regs)
        assert "smem" not in rest or re.search(r"\b0 bytes smem", rest), (name, rest)


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_persistent_shared_fits_at_flashrnn_sizes(arch):
    """The persistent kernels' dynamic shared memory per block, at one block per SM, fits the
    architecture's limit for every cell and dtype at hidden 768 and 1024 (the nvcc build's own
    size formulas; the backend asks the occupancy API on a device)."""
    library = cuda_library.Library(cuda_library.build(emulate=False))
    _, limit, sm_count = LIMITS[arch]
    for hidden in (768, 1024):
        units = -(-hidden // sm_count)
        for cell in CELL_NAMES:
            for dtype in cuda_library.DTYPE_CODES:
                for kernel in (cuda_library.PERSISTENT_FORWARD, cuda_library.PERSISTENT_BACKWARD):
                    shared, _ = library.persistent_sizes(kernel, cell, dtype, hidden, 16, units)
                    if dtype == torch.float64 and shared > limit:
                        continue  # float64 at these sizes: refused on chip, falls back
                    assert shared <= limit, (arch, hidden, cell, dtype, kernel, shared)


@emulated
def test_persistent_refuses_what_does_not_fit_and_cuda_falls_back(sms, rng):
    """With one block resident, W_hh's slice is the whole matrix: at hidden 200 in float64 an
    LSTM's is 1.25 MiB, over the 227 KB a block may have, so the persistent kernel refuses it,
    saying why, and the ``cuda`` alias runs it on the per-step kernels."""
    sms(1)
    spec = LayerSpec(torch.device("cpu"), torch.float64, CELLS["lstm"], 200)
    assert "shared memory" in dispatch.reason("cuda:persistent", spec)
    dispatch.forget_choices()
    try:
        assert dispatch.select("cuda", spec).name == "cuda:pointwise"
    finally:
        dispatch.forget_choices()


def test_gpu_check_without_a_device(tmp_path):
    """bench/gpu_check.py on a machine without CUDA: exit 0 and a report that says so."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "No CUDA device" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["status"] == "no CUDA device"


# ---- the GPU families' public ``sequence`` checks its arguments ----

LOOP_BACKENDS = ["cuda:persistent", "cuda:pointwise", "triton:persistent", "triton:alternating"]


def _wrong(t):
    """Ways a tensor argument can be wrong (each raises before any kernel runs)."""
    out = [t[:-1], torch.cat([t, t[:1]]), t.unsqueeze(0),
           t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)]
    if t.dim() == 2:
        out += [t.reshape(-1), t[:, :-1], torch.cat([t, t[:, :1]], 1)]
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", LOOP_BACKENDS)
def test_sequence_refuses_inconsistent_arguments(backend, cell, rng):
    """Each tensor argument wrong in turn (short, long, 3-D, other dtype, flat, narrow, wide),
    tampered step counts, and a state a cell does not have: a RuntimeError, not a kernel
    reading past a buffer."""
    if not runs_on_cpu_tensors(backend):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    from sequence_check import run_sequence, sequence_inputs
    path = dispatch._REGISTRY[backend]
    dtype = torch.float64 if backend.startswith("cuda") else torch.float32
    good = sequence_inputs(CELLS[cell], torch.tensor([3, 2, 2]), 5, dtype=dtype)
    run_sequence(path, CELLS[cell], good, reverse=False)  # the good arguments run
    cases = []
    for name in ("xp", "h0", "c0", "w_hh", "b_hh"):
        if good[name] is not None:
            cases += [(name, bad) for bad in _wrong(good[name].detach())]
    cases += [("batch_sizes", torch.tensor(v)) for v in ([2, 3, 2], [3, 2, -1], [3, 2, 1],
                                                         [3, 2, 3], [0, 0, 0], [-3, 2, 2], [])]
    cases += [("batch_sizes", torch.tensor([3, 2, 2], dtype=torch.int32)),
              ("batch_sizes", torch.tensor([[3, 2, 2]]))]
    cases.append(("c0", None) if cell == "lstm" else ("c0", torch.zeros(3, 5, dtype=dtype)))
    for name, bad in cases:
        with pytest.raises(RuntimeError, match="fusedrnn"):
            run_sequence(path, CELLS[cell], dict(good, **{name: bad}), reverse=False)
    # an empty batch is not an error (torch.nn returns empty outputs)
    empty = sequence_inputs(CELLS[cell], torch.tensor([0, 0]), 5, dtype=dtype)
    y, h_n, _ = run_sequence(path, CELLS[cell], empty, reverse=False)
    assert y.shape == (0, 5) and h_n.shape == (0, 5)
