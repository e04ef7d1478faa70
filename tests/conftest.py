"""Shared test helpers: random configurations, tolerances, and finding ../shared/data."""
import os

# No GPU here: Triton kernels run in its interpreter, which must be chosen before Triton is
# imported (fusedrnn imports it lazily, on first use of a triton backend).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Likewise the CUDA C++ kernels run on CPU threads (csrc/cuda/emulate); bench/gpu_check.py sets
# both to 0 to run the suite's GPU tests on a real device.
os.environ.setdefault("FUSEDRNN_CUDA_EMULATE", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def runs_on_cpu_tensors(name):
    """Whether backend ``name`` runs on CPU tensors here: built and available, and for the GPU
    kernel families, in their CPU mode (Triton's interpreter, the CUDA emulation)."""
    import fusedrnn
    if fusedrnn.backends()[name] != "available":
        return False
    if name.startswith("triton"):
        return os.environ.get("TRITON_INTERPRET") == "1"
    if name.startswith("cuda"):
        return os.environ.get("FUSEDRNN_CUDA_EMULATE") == "1"
    return True


def takes_proj_size(name, dtype=None):
    """Whether backend ``name`` runs an LSTM with ``proj_size`` (the persistent kernels do not)."""
    from fusedrnn import dispatch
    from fusedrnn.backend.base import LayerSpec
    from fusedrnn.cells import CELLS
    spec = LayerSpec(torch.device("cpu"), dtype or torch.float32, CELLS["lstm"], 4, 2)
    return dispatch.reason(name, spec) is None


def tolerances(dtype):
    """(rtol, atol) that fit a dtype when comparing two correct implementations."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}[dtype]


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def rng(request):
    """A fresh seed per test (printed on failure), so every run draws new inputs."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"{request.node.nodeid}: seed {seed}")  # shown by pytest when the test fails
    return random.Random(seed)


@pytest.fixture(scope="session")
def data_dir():
    from tasks.data import find_data_dir
    path = find_data_dir()
    if path is None:
        pytest.skip("shared data directory not found (set FUSEDRNN_DATA)")
    return path
