"""Shared test setup.

Without a GPU, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must
be set before triton is first imported, hence here, before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dcft_kernels.autograd import is_available  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Backends of the fused op that can run here; the torch one always can.
FUSED_BACKENDS = [name for name in ("torch", "triton", "cpp") if is_available(name)]


def devices():
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]
