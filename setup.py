"""Builds the optional C++ extension ``fusedrnn._C`` from csrc/cpu against the installed torch,
and, where torch has CUDA and nvcc is present, the CUDA kernel library (csrc/cuda).

Without a working compiler the build is skipped with a warning; the package still imports
and ``fusedrnn.backends()`` reports the extension as missing. The CUDA library is otherwise
built on first use (fusedrnn/backend/cuda_library.py); a CPU-only install builds nothing more.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}


def _arch_flags():
    """-march=native: the pointwise loops auto-vectorize to the build machine's widest ISA.

    512-bit vectors where the CPU has them: the LSTM pointwise pass measured ~30 % faster than
    GCC's default 256-bit choice on this AVX-512 Xeon. The extension is built where it is
    installed; set FUSEDRNN_ARCH_FLAGS (e.g. to "-march=x86-64-v3" or "") to build a binary
    for other machines.
    """
    return os.environ.get("FUSEDRNN_ARCH_FLAGS", "-march=native -mprefer-vector-width=512").split()

def _build_cuda_kernels():
    """nvcc-builds csrc/cuda/library.cu (sm_80, sm_90) into fusedrnn's kernel cache now, when
    torch has CUDA and nvcc is found; never fails the install."""
    import torch
    if torch.version.cuda is None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "cuda_library", os.path.join(here, "fusedrnn", "backend", "cuda_library.py"))
    library = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(library)
        print(f"fusedrnn: built the CUDA kernels: {library.build(emulate=False)}", file=sys.stderr)
    except Exception as exc:  # no nvcc, a toolchain error: built on first use, or unavailable
        print(f"fusedrnn: the CUDA kernels were not built now ({exc})", file=sys.stderr)


try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch not importable at build time: pure-Python install
    print("fusedrnn: torch not found at build time, skipping the C++ extension", file=sys.stderr)
else:
    class OptionalBuildExtension(BuildExtension):
        def run(self):
            super().run()
            _build_cuda_kernels()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # no compiler, bad toolchain: keep the pure-Python package
                print(f"fusedrnn: building {ext.name} failed ({exc}); the 'cpu' backend "
                      "will be unavailable", file=sys.stderr)

    here = os.path.dirname(os.path.abspath(__file__))
    ext_modules.append(CppExtension(
        name="fusedrnn._C",
        sources=sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
        include_dirs=[os.path.join(here, "csrc")],
        # -g0: Python's default CFLAGS add -g, which doubles the compile time of these
        # template-heavy units for debug info nobody ships
        extra_compile_args=["-O3", "-g0", "-fopenmp", *_arch_flags()],
        extra_link_args=["-fopenmp"],
    ))
    cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
