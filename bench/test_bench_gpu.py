"""GPU section: the Triton and CUDA C++ paths vs cuDNN, forward and forward+backward.

Run on a CUDA machine: ``python -m pytest bench/test_bench_gpu.py -s``. Each case prints
the median times of ``triton.testing.do_bench`` and the ratios cuDNN time / our time
(> 1: ours faster), measured in the same process. A path that cannot run a shape (the
persistent kernel beyond its on-chip budget) is reported as such, not timed.
Shapes: the seed experiments' (T, B, I, H, layers) and FlashRNN's setting (B=16, T=1024,
hidden 768).
"""
import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device (none here; the kernels are proven in "
                "the interpreter by tests/test_kernels_triton.py)", allow_module_level=True)
triton_testing = pytest.importorskip("triton.testing")

import fusedrnn  # noqa: E402
from shapes import SEED_SHAPES  # noqa: E402

SHAPES = {**SEED_SHAPES, "flashrnn": (1024, 16, 768, 768, 1)}  # FlashRNN's public setting
PATHS = ["triton:persistent", "triton:alternating", "cuda:persistent", "cuda:pointwise"]


def _time(model, x, backward):
    def step():
        y, _ = model(x)
        if backward:
            y.sum().backward()
    return triton_testing.do_bench(step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_vs_cudnn(shape, mode, dtype):
    steps, batch, inputs, hidden, layers = SHAPES[shape]
    ref = getattr(nn, mode)(inputs, hidden, layers).to("cuda", dtype)
    x = torch.randn(steps, batch, inputs, device="cuda", dtype=dtype, requires_grad=True)
    line = [f"{shape:9s} {mode} {str(dtype)[6:]:8s}"]
    for backward in (False, True):
        cudnn = _time(ref, x, backward)
        line.append(f"{'fwd+bwd' if backward else 'fwd'}: cudnn {cudnn:.3f} ms")
        for path in PATHS:
            ours = getattr(fusedrnn, mode)(inputs, hidden, layers, backend=path)
            ours = ours.to("cuda", dtype)
            try:
                fusedrnn.resolved_backend(ours, x)
            except fusedrnn.BackendUnavailableError as exc:
                line.append(f"{path} n/a ({exc})")
                continue
            ours.load_state_dict(ref.state_dict())
            t = _time(ours, x, backward)
            line.append(f"{path} {t:.3f} ms (x{cudnn / t:.2f})")
    print(" | ".join(line))
