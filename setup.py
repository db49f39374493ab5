"""Build script. Metadata lives in pyproject.toml.

The package is pure Python today; the C++/CUDA extension in ``csrc/`` is
compiled on first use (see ``dcft_kernels/ops/cpp_backend.py``), so installing
never needs a compiler and never pulls a second copy of torch.
"""
from setuptools import setup

setup()
