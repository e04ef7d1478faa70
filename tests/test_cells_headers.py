"""csrc/cells/*.h are shared with the future CUDA kernels: prove they compile as device code.

Compile only (this machine has no GPU); skipped where nvcc is not installed.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cells_compile_as_cuda(tmp_path, arch):
    src = os.path.join(ROOT, "tests", "cuda", "cells_compile_check.cu")
    result = subprocess.run(
        [NVCC, "-x", "cu", f"-arch={arch}", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), "-c",
         src, "-o", str(tmp_path / "cells.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
