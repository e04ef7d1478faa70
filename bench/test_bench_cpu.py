"""CPU speed: torch.nn vs a *Cell Python loop vs fusedrnn ``cpu`` vs fusedrnn ``reference``.

Shapes are the seed experiments' (issue 3). Run through ``python bench/run_cpu.py``, which
renders the ratio table (bench/RESULTS_CPU.md) from this file's pytest-benchmark JSON.
Threads: FUSEDRNN_BENCH_THREADS (default 2); rounds: FUSEDRNN_BENCH_ROUNDS (default 5), each
one call, or a loop of calls ~10 ms long for a layer faster than that.
"""
import os
import time

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from shapes import KINDS, SEED_SHAPES, cell_of

THREADS = int(os.environ.get("FUSEDRNN_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("FUSEDRNN_BENCH_ROUNDS", "5"))
torch.set_num_threads(THREADS)


PACKED_SHAPES = ["smnist", "ptb"]  # lengths drawn uniformly from [T/2, T]
IMPLS = ["nn", "cell_loop", "cpu", "reference"]


def gemm_flops(kind, shape, rows=None):
    """Forward GEMM flops (input projection + recurrent); fwd+bwd counts 3x."""
    T, B, I, H, L = shape
    rows = T * B if rows is None else rows
    G = cell_of(kind).gates
    return sum(2 * rows * ((I if layer == 0 else H) + H) * G * H for layer in range(L))


class CellLoop(nn.Module):
    """What people write without a fused layer: a Python time loop over nn.*Cell."""

    def __init__(self, cell_cls, I, H, L):
        super().__init__()
        self.cells = nn.ModuleList(cell_cls(I if k == 0 else H, H) for k in range(L))
        self.lstm = cell_cls is nn.LSTMCell

    def forward(self, x):
        for cell in self.cells:
            state = None
            outs = []
            for x_t in x:
                state = cell(x_t, state)
                outs.append(state[0] if self.lstm else state)
            x = torch.stack(outs)
        return x, None


_models = {}


def model(kind, shape_name, impl):
    key = (kind, shape_name, impl)
    if key not in _models:
        torch.manual_seed(0)
        layer_cls, cell_cls, _ = KINDS[kind]
        T, B, I, H, L = SEED_SHAPES[shape_name]
        if impl == "cell_loop":
            _models[key] = CellLoop(cell_cls, I, H, L)
        elif impl == "nn":
            _models[key] = layer_cls(I, H, L)
        else:
            _models[key] = fusedrnn.convert(layer_cls(I, H, L), backend=impl)
    return _models[key]


def run(benchmark, m, make_input, mode):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                m(make_input())
    else:
        def fn():
            out, _ = m(make_input())
            (out.data if hasattr(out, "batch_sizes") else out).sum().backward()
    # Calls shorter than ~10 ms are timed in a loop of that length per round (a lone 0.2 ms
    # call mostly measures how cold the caches and the Python paths are after the previous
    # benchmark), longer ones one call per round.
    fn()
    start = time.perf_counter()
    fn()
    iterations = int(min(max(0.01 / (time.perf_counter() - start), 1), 100))
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=iterations, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(SEED_SHAPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_padded(benchmark, kind, shape_name, impl, mode):
    T, B, I, H, L = SEED_SHAPES[shape_name]
    benchmark.group = f"{kind} {shape_name} {mode}"
    benchmark.extra_info.update(kind=kind, shape=shape_name, impl=impl, mode=mode,
                                threads=THREADS, flops=gemm_flops(kind, SEED_SHAPES[shape_name])
                                * (3 if mode == "fwdbwd" else 1))
    x = torch.randn(T, B, I)
    run(benchmark, model(kind, shape_name, impl), lambda: x, mode)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["nn", "cpu"])
@pytest.mark.parametrize("shape_name", PACKED_SHAPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed(benchmark, kind, shape_name, impl, mode):
    """Packed input, lengths spread over 50-100 % of T (compare with padded nn: test_padded)."""
    T, B, I, H, L = SEED_SHAPES[shape_name]
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen).sort(descending=True).values
    lengths[0] = T
    x = torch.randn(T, B, I)
    benchmark.group = f"{kind} {shape_name} {mode}"
    benchmark.extra_info.update(kind=kind, shape=shape_name, impl=impl + "_packed", mode=mode,
                                threads=THREADS,
                                flops=gemm_flops(kind, SEED_SHAPES[shape_name], int(lengths.sum()))
                                * (3 if mode == "fwdbwd" else 1))
    run(benchmark, model(kind, shape_name, impl), lambda: pack_padded_sequence(x, lengths), mode)


def test_gemm_peak(benchmark):
    """The GEMM roof the GFLOP/s column is compared with: torch.mm (MKL), 1024^3, float32."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out = torch.empty(1024, 1024)
    benchmark.group = "gemm peak"
    # (runs after the layer benchmarks: the forward GEMM routes they were measured on)
    benchmark.extra_info.update(impl="gemm", flops=2 * 1024 ** 3, threads=THREADS,
                                routes=fusedrnn.cpu_info().get("measured_routes", []))
    benchmark.pedantic(lambda: torch.mm(a, b, out=out), rounds=max(ROUNDS, 10), iterations=1,
                       warmup_rounds=2)
