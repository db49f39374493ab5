"""The structured-delta op through the C++ extension in ``csrc/`` (``torch.ops.dcft_kernels.cpp_*``).

The extension is built by ``setup.py`` when a compiler is present at install time
(``dcft_kernels/_C*.so``); otherwise it is compiled on first use with
``torch.utils.cpp_extension.load`` and cached. CUDA sources join the build only
where both a CUDA toolkit and a CUDA build of torch are present.
"""
from __future__ import annotations

import glob
import os
import sys
from functools import lru_cache

import torch

from ..plan import is_plain_dcft

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")
CPU_SOURCES = ["register.cpp", "structured_delta_cpu.cpp", "low_rank_cpu.cpp"]
CUDA_SOURCES = ["structured_delta_cuda.cu"]
# Portable by default, like setup.py's build; DCFT_KERNELS_CPU_FLAGS="-O3 -march=native" tunes for
# this machine's CPU (a build that is then copied to an older CPU dies with an illegal instruction).
# -fopenmp as in setup.py: without it at::parallel_for, a header template, runs on one thread.
CPU_FLAGS = os.environ.get("DCFT_KERNELS_CPU_FLAGS", "-O3").split() + (
    ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else [])


def cuda_build_possible() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(csrc_dir: str = CSRC_DIR) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if cuda_build_possible() else [])
    return [os.path.join(csrc_dir, name) for name in names]


@lru_cache(maxsize=None)
def _load() -> None:
    prebuilt = glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd"))
    if prebuilt:
        torch.ops.load_library(prebuilt[0])
    else:
        if not os.path.isdir(CSRC_DIR):
            raise RuntimeError(f"the C++ extension was not built at install time and {CSRC_DIR} is missing")
        from torch.utils.cpp_extension import load

        load(name="dcft_kernels_cpp", sources=sources(), extra_cflags=CPU_FLAGS, extra_cuda_cflags=["-O3"],
             is_python_module=False, verbose=False)
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("dcft_kernels::cpp_forward")
    def _(x, weight, bias, A, B, core, kernel, scaling, p, seed):
        d = 1 if kernel is None else kernel.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)
        keep = x.new_empty(x.shape[0] if p > 0 else 0, -(-x.shape[1] // 64), dtype=torch.int64)
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0] * d, dtype=acc), keep

    @torch.library.register_fake("dcft_kernels::cpp_backward")
    def _(grad_y, x, weight, A, B, core, kernel, T, keep, scaling, p, need_x, need_a, need_b, need_c, need_k):
        def maybe(flag, ref):
            return ref.new_empty(ref.shape) if flag and ref is not None else x.new_empty(0)

        return [maybe(need_x, x), maybe(need_a, A), maybe(need_b, B), maybe(need_c, core), maybe(need_k, kernel)]

    @torch.library.register_fake("dcft_kernels::cpp_shrink")
    def _(v, M, d, scale, p, seed):
        return v.new_empty(v.shape[0], M.shape[1], d, dtype=torch.promote_types(v.dtype, torch.float32))

    @torch.library.register_fake("dcft_kernels::cpp_expand_")
    def _(out, U, M, scale, p, seed):
        return None

    @torch.library.register_fake("dcft_kernels::cpp_reduce")
    def _(v, U, blocks, p, seed):
        return U.new_empty(blocks, U.shape[1])


def is_available() -> bool:
    """Loads (building if needed) the extension; raises with the reason when it cannot."""
    _load()
    return True


def has_cuda_kernels() -> bool:
    return is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("dcft_kernels::cpp_shrink", "CUDA")


def _check_device(x):
    if x.device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError("backend='cpp' got CUDA tensors but the extension was built without CUDA kernels "
                           "(needs a CUDA toolkit and a CUDA build of torch); use backend='triton' or 'torch'")


# ---- the fused override: one per-token pass on the CPU -------------------------------------------------

def fuses(x, A, kernel, order, activation, row_scale) -> bool:
    return x.device.type == "cpu" and is_plain_dcft(order, kernel, activation, row_scale)


def forward(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    """(y, saved): saved is T and the dropout keep-bits, which backward reads instead of redrawing."""
    y, T, keep = torch.ops.dcft_kernels.cpp_forward(x, weight, bias, A, B, core, kernel, scaling, p, seed)
    return y, (T, keep)


def backward(grad_y, x, weight, A, B, core, kernel, saved, scaling, p, seed, needs_grad):
    T, keep = saved
    outs = torch.ops.dcft_kernels.cpp_backward(grad_y, x, weight, A, B, core, kernel, T, keep, scaling, p, *needs_grad)
    return tuple(out if flag else None for out, flag in zip(outs, needs_grad))


# ---- the plan's primitives (CPU loops, or the CUDA kernels) -------------------------------------------

def round_once(x) -> bool:
    return x.device.type == "cpu"  # as the fused CPU pass does


def shrink(v, M, d, scale, p, seed):
    _check_device(v)
    return torch.ops.dcft_kernels.cpp_shrink(v, M, d, scale, p, seed)


def expand_(out, U, M, scale, p, seed):
    torch.ops.dcft_kernels.cpp_expand_(out, U, M, scale, p, seed)


def reduce(v, U, blocks, p, seed):
    return torch.ops.dcft_kernels.cpp_reduce(v, U, blocks, p, seed)
