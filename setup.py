"""Build script. Metadata lives in pyproject.toml.

Builds the C++ extension ``dcft_kernels._C`` (csrc/) with ninja against the torch
that is already installed: install with ``pip install --no-build-isolation`` so pip
does not fetch another torch into a build environment. The extension is optional:
without torch or a compiler the package installs anyway and ``dcft_kernels``
compiles it on first use, or falls back to the torch backend.
"""
import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/register.cpp", "csrc/structured_delta_cpu.cpp", "csrc/low_rank_cpu.cpp"]
CUDA_SOURCES = ["csrc/structured_delta_cuda.cu"]


def openmp_flags(torch):
    """-fopenmp where torch runs on OpenMP (Linux builds): ATen's at::parallel_for is a header template
    that runs its body on one thread unless the extension itself is compiled with OpenMP. Compiled
    only, not linked: the calls resolve to the libgomp torch loaded, so the process keeps one pool."""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def extension_build():
    if os.environ.get("DCFT_KERNELS_NO_EXTENSION") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}
    # Portable by default (a wheel or build copied to an older CPU still runs);
    # DCFT_KERNELS_CPU_FLAGS="-O3 -march=native" tunes for the building machine.
    cflags = os.environ.get("DCFT_KERNELS_CPU_FLAGS", "-O3").split() + openmp_flags(torch)
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext = CUDAExtension("dcft_kernels._C", CPU_SOURCES + CUDA_SOURCES, optional=True,
                            extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]})
    else:
        ext = CppExtension("dcft_kernels._C", CPU_SOURCES, optional=True, extra_compile_args={"cxx": cflags})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**extension_build())
