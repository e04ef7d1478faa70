"""Builds and loads the CUDA kernels' library (csrc/cuda/library.cu) and calls it by ctypes.

Two builds of one source, picked by the environment once per process:

- ``FUSEDRNN_CUDA_EMULATE=1``: g++ builds it with csrc/cuda/emulate/emulate.h, and the kernels
  run on CPU threads over CPU tensors (for tests; like ``TRITON_INTERPRET=1``);
- otherwise, with a CUDA torch and nvcc: nvcc builds GPU code for sm_80 and sm_90.

Either is built on first use into ``FUSEDRNN_CACHE`` (default ``~/.cache/fusedrnn``), keyed by a
hash of the sources and the command, and reused after. The library needs no torch: the
tensors' data pointers and the current stream go in, and a message comes back on failure.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "csrc")
SOURCE = os.path.join(_CSRC, "cuda", "library.cu")

# Kernel codes and storage dtype codes of library.cu.
POINTWISE_FORWARD, POINTWISE_BACKWARD, PERSISTENT_FORWARD, PERSISTENT_BACKWARD = range(4)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ARCHS = (80, 90)


def emulating() -> bool:
    return os.environ.get("FUSEDRNN_CUDA_EMULATE") == "1"


class KernelArgs(ctypes.Structure):
    """csrc/cuda/kernels.h's KernelArgs, field for field."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("hidden", "batch", "steps", "n", "n_prev", "units")]
                + [(n, ctypes.c_int32) for n in ("reverse", "save", "write_h", "has_dy")]
                + [(n, ctypes.c_void_p) for n in (
                    "sizes", "offsets", "xp", "hg", "h0", "c0", "w_hh", "b_hh", "h_prev",
                    "c_prev", "dy", "dh_n", "dc_n", "h", "c", "y", "out", "hg_all", "c_all",
                    "h_n", "c_n", "dh", "dc", "dxp", "dhg", "dh0", "dc0", "scratch")])


def make_args(**values) -> KernelArgs:
    """A KernelArgs from ints and tensors (a tensor gives its data pointer; None gives null)."""
    args = KernelArgs()
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            v = v.data_ptr()
        setattr(args, name, v)
    return args


def compile_command(emulate: bool, out: str) -> List[str]:
    """The build command for one flavour of the library."""
    if emulate:
        return ["g++", "-std=c++20", "-O2", "-g0", "-shared", "-fPIC", "-pthread",
                "-DFUSEDRNN_CUDA_EMULATE", "-I", _CSRC, "-x", "c++", SOURCE, "-o", out]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [_nvcc() or "nvcc", "-std=c++17", "-O3", "--threads", "0", "-shared", "-Xcompiler",
            "-fPIC",
            "-cudart", "static", "-I", _CSRC, *gencode, SOURCE, "-o", out]


def _nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _sources_digest(command: List[str]) -> str:
    digest = hashlib.sha256(" ".join(command[:-1]).encode())
    for path in sorted(glob.glob(os.path.join(_CSRC, "cuda", "**", "*.*"), recursive=True)
                       + glob.glob(os.path.join(_CSRC, "cells", "*.h"))):
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    return digest.hexdigest()[:16]


def build(emulate: bool) -> str:
    """Builds (or finds in the cache) one flavour of the library; returns its path."""
    if not os.path.exists(SOURCE):
        raise RuntimeError(f"the CUDA kernel sources are not here ({SOURCE}): fusedrnn runs "
                           f"them from a source checkout (pip install -e .)")
    cache = os.environ.get("FUSEDRNN_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                          "fusedrnn"))
    os.makedirs(cache, exist_ok=True)
    name = "emulated" if emulate else "cuda"
    probe = compile_command(emulate, "OUT")
    if shutil.which(probe[0]) is None and not os.path.exists(probe[0]):
        raise RuntimeError(f"{probe[0]} not found: it builds the {name} kernel library")
    path = os.path.join(cache, f"fusedrnn_{name}_{_sources_digest(probe)}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    result = subprocess.run(compile_command(emulate, tmp), capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building the {name} kernel library failed:\n{result.stderr[-3000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build of the same sources is harmless
    return path


class Library:
    """The loaded library, with typed calls that raise RuntimeError on a failure."""

    def __init__(self, path: str):
        lib = self._lib = ctypes.CDLL(path)
        i64p, err = ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p
        lib.fusedrnn_cuda_mode.restype = ctypes.c_char_p
        lib.fusedrnn_cuda_cell_names.restype = ctypes.c_char_p
        lib.fusedrnn_cuda_cell_traits.argtypes = [ctypes.c_char_p, i64p, err, ctypes.c_int]
        lib.fusedrnn_cuda_persistent_sizes.argtypes = [
            ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, i64p, i64p, err, ctypes.c_int]
        lib.fusedrnn_cuda_resident_blocks.argtypes = [
            ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_int64, i64p, i64p, err, ctypes.c_int]
        lib.fusedrnn_cuda_launch.argtypes = [
            ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(KernelArgs),
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, err,
            ctypes.c_int]
        self.mode = lib.fusedrnn_cuda_mode().decode()
        self.cells = [c for c in lib.fusedrnn_cuda_cell_names().decode().split(",") if c]
        self._traits: Dict[str, Tuple[int, ...]] = {}

    @staticmethod
    def _check(status: int, error) -> None:
        if status != 0:
            raise RuntimeError(f"fusedrnn CUDA kernels: {error.value.decode(errors='replace')}")

    def cell_traits(self, cell: str) -> Optional[Tuple[int, ...]]:
        """{gates, states, reads h, split hidden grad, saved} as built, or None."""
        if cell not in self.cells:
            return None
        if cell not in self._traits:
            out, error = (ctypes.c_int64 * 5)(), ctypes.create_string_buffer(512)
            self._check(self._lib.fusedrnn_cuda_cell_traits(cell.encode(), out, error, 512),
                        error)
            self._traits[cell] = tuple(out)
        return self._traits[cell]

    def persistent_sizes(self, kernel: int, cell: str, dtype: torch.dtype, hidden: int,
                         batch: int, units: int) -> Tuple[int, int]:
        """(dynamic shared bytes, scratch elements) of a persistent kernel."""
        shared, scratch = ctypes.c_int64(), ctypes.c_int64()
        error = ctypes.create_string_buffer(512)
        self._check(self._lib.fusedrnn_cuda_persistent_sizes(
            kernel, cell.encode(), DTYPE_CODES[dtype], hidden, batch, units,
            ctypes.byref(shared), ctypes.byref(scratch), error, 512), error)
        return shared.value, scratch.value

    def resident_blocks(self, kernel: int, cell: str, dtype: torch.dtype, device: int,
                        threads: int, shared: int) -> Tuple[int, int]:
        """(blocks resident at once on the device, its shared-memory limit per block)."""
        blocks, limit = ctypes.c_int64(), ctypes.c_int64()
        error = ctypes.create_string_buffer(512)
        self._check(self._lib.fusedrnn_cuda_resident_blocks(
            kernel, cell.encode(), DTYPE_CODES[dtype], device, threads, shared,
            ctypes.byref(blocks), ctypes.byref(limit), error, 512), error)
        return blocks.value, limit.value

    def launch(self, kernel: int, cell: str, dtype: torch.dtype, args: KernelArgs,
               device: torch.device, grid: int, block: int, shared: int = 0) -> None:
        index, stream = 0, None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(index).cuda_stream
        error = ctypes.create_string_buffer(1024)
        self._check(self._lib.fusedrnn_cuda_launch(
            kernel, cell.encode(), DTYPE_CODES[dtype], ctypes.byref(args), index, grid, block,
            shared, stream, error, 1024), error)


@functools.lru_cache(maxsize=None)
def _load(emulate: bool) -> Tuple[Optional[Library], Optional[str]]:
    try:
        return Library(build(emulate)), None
    except (RuntimeError, OSError) as exc:
        return None, str(exc)


def load() -> Tuple[Optional[Library], Optional[str]]:
    """(the library for this process's mode, None) or (None, why it cannot be had)."""
    if not emulating():
        if not torch.cuda.is_available():
            return None, ("no CUDA device (set FUSEDRNN_CUDA_EMULATE=1 to run the kernels on "
                          "CPU threads over CPU tensors)")
    return _load(emulating())
