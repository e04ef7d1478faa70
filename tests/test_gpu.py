"""Every GPU backend on CUDA tensors, against the float64 reference and against torch.nn
(cuDNN). Skipped without a CUDA device; ``python bench/gpu_check.py`` runs it on one (with
TRITON_INTERPRET=0 and FUSEDRNN_CUDA_EMULATE=0, and Triton's autotuning off to compile less).
"""
import random

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import dispatch
from fusedrnn.backend.base import LayerSpec
from fusedrnn.cells import CELLS
from sequence_check import check_sequence, random_batch_sizes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = ["cuda:persistent", "cuda:pointwise", "triton:persistent", "triton:alternating"]
# normwise (rtol, atol) against float64 from the same rounded inputs; fp32 is looser than on
# the CPU: the persistent Triton kernel's fp32 dot is tf32x3 on sm_90
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5),
       torch.float16: (1e-2, 1e-3), torch.bfloat16: (6e-2, 1e-2)}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}


def _skip_unless_runs(backend, cell, dtype, hidden, proj=0):
    why = dispatch.reason(backend, LayerSpec(torch.device("cuda"), dtype, CELLS[cell], hidden,
                                             proj))
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_matches_reference(backend, cell, dtype, rng):
    dtype = DTYPES[dtype]
    _skip_unless_runs(backend, cell, dtype, 40)
    check_sequence(dispatch._REGISTRY[backend], cell, random_batch_sizes(rng, 7, 37, True), 40,
                   reverse=rng.random() < 0.5, dtype=dtype, device="cuda", scale=0.3,
                   tol=TOL[dtype], check_grads=not (cell == "rnn_relu" and dtype.itemsize == 2))


@pytest.mark.parametrize("hidden", [200, 768])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_persistent_wide(cell, hidden, rng):
    """Hidden sizes split over many blocks of a real device (the FlashRNN width)."""
    _skip_unless_runs("cuda:persistent", cell, torch.float32, hidden)
    check_sequence(dispatch._REGISTRY["cuda:persistent"], cell,
                   random_batch_sizes(rng, 6, 16, True), hidden, reverse=rng.random() < 0.5,
                   dtype=torch.float32, device="cuda", scale=0.1, tol=TOL[torch.float32])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_cudnn(backend, kind):
    """Two bidirectional layers on a packed batch against torch.nn on the GPU (cuDNN), fp32:
    outputs, final states, and every parameter's gradient."""
    rng = random.Random(0)
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's RNNs run TF32 by default: compare fp32
    ref = getattr(nn, kind)(24, 32, num_layers=2, bidirectional=True).cuda()
    ours = getattr(fusedrnn, kind)(24, 32, num_layers=2, bidirectional=True,
                                   backend=backend).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 6, 24, device="cuda")
    try:
        fusedrnn.resolved_backend(ours, x)
    except fusedrnn.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    lengths = sorted([rng.randint(1, 9) for _ in range(6)], reverse=True)
    results = []
    for layer in (ref, ours):
        y, state = layer(pack_padded_sequence(x, lengths))
        y, _ = pad_packed_sequence(y)
        states = state if isinstance(state, tuple) else (state,)
        loss = (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum() \
            + sum((s ** 2).sum() for s in states)
        results.append([y, *states, *torch.autograd.grad(loss, list(layer.parameters()))])
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
