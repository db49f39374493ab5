"""The autograd.Function of the structured-delta op, and backend dispatch.

Saved for backward: ``x`` (a reference, never a copy), the frozen/trainable
factors, and the small fp32 ``T`` (tokens × r × d_in). ΔW is never built. The dropout
mask is regenerated from its seed, except by the fused C++ CPU pass, which keeps it as
bits (1/32 of ``x`` in fp32): on a CPU, drawing it costs more than the rest of the adapter.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

import torch

from . import plan

BACKENDS = ("auto", "torch", "triton", "cpp", "reference")
_OP_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "cpp": "cpp_backend"}


@lru_cache(maxsize=None)
def _load(name: str):
    return importlib.import_module(f"dcft_kernels.ops.{_OP_MODULES[name]}")


# DCFT_KERNELS_STRICT=1 (set in CI): a backend that fails to load is an error, not a warning, so a
# broken C++ build or Triton install cannot hide behind the torch fallback.
STRICT = os.environ.get("DCFT_KERNELS_STRICT") == "1"


@lru_cache(maxsize=None)
def is_available(name: str) -> bool:
    """Whether backend ``name`` can run here (imports it, compiling the C++ one if needed).

    A backend that fails to load gives a warning naming the cause and False, or, with
    ``DCFT_KERNELS_STRICT=1``, a RuntimeError."""
    if name in ("torch", "reference"):
        return True
    try:
        return bool(_load(name).is_available())
    except Exception as exc:  # missing triton, no compiler, ...
        if STRICT:
            raise RuntimeError(f"dcft_kernels: backend {name!r} failed to load ({type(exc).__name__}: {exc}) "
                               "and DCFT_KERNELS_STRICT=1") from exc
        warnings.warn(f"dcft_kernels: backend {name!r} is unavailable ({exc})", stacklevel=3)
        return False


_OPS: dict = {}  # concrete backend name -> its loaded module, filled by resolve_backend


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: no graph break
def resolve_backend(name: str, device_type: str) -> str:
    """Map a requested backend (possibly "auto") to the concrete one used on ``device_type``,
    loading it; a backend asked for by name that cannot run here is a clear ``RuntimeError``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return name
    if name == "auto":
        if device_type == "cuda" and is_available("triton"):
            name = "triton"
        elif is_available("cpp") and (device_type != "cuda" or _load("cpp").has_cuda_kernels()):
            name = "cpp"
        else:
            name = "torch"
    elif not is_available(name):
        raise RuntimeError(f"backend={name!r} was requested but is not available on this machine")
    _OPS[name] = _load(name)
    return name


class StructuredDeltaLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · row_scale ⊙ drop(x) ΔWᵀ`` with exact gradients for every input.

    Runs the backend's fused override where it declares one for the call, else the plan
    (``plan.py``) over the backend's primitives."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, core, kernel, row_scale, scaling, p, seed, order, activation, backend):
        ops = _OPS[backend]
        x2d = x.reshape(-1, x.shape[-1])
        fused = hasattr(ops, "fuses") and ops.fuses(x2d, A, kernel, order, activation, row_scale)
        if fused:  # saved: what the backend's own backward needs (T, and for some the dropout keep-bits)
            y, saved = ops.forward(x2d, weight, bias, A, B, core, kernel, scaling, p, seed)
        else:
            y, T = plan.forward(ops, x2d, weight, bias, A, B, core, kernel, row_scale, scaling, p, seed, order,
                                activation)
            saved = (T,)
        # x itself, not its 2-D view: a non-contiguous x would be copied by reshape.
        ctx.save_for_backward(x, weight, A, B, core, kernel, row_scale, *saved)
        ctx.scaling, ctx.p, ctx.seed, ctx.order, ctx.activation = scaling, p, seed, order, activation
        ctx.backend, ctx.fused = backend, fused
        # Not a view of y (without copying it), for any leading dims: FSDP2 and in-place residual adds
        # need a plain output (nn.Linear itself returns a view for 3-D inputs). detach() makes an
        # alias that autograd does not track as a view.
        return y.reshape(*x.shape[:-1], weight.shape[0]).detach()

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, A, B, core, kernel, row_scale, *saved = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
        need_x, need_w, need_bias, need_a, need_b, need_c, need_k = ctx.needs_input_grad[:7]
        needs = (need_x, need_a, need_b, need_c, need_k)  # False for an absent core or kernel
        ops = _OPS[ctx.backend]
        if ctx.fused:
            grads = ops.backward(grad_y2d, x2d, weight, A, B, core, kernel, saved, ctx.scaling, ctx.p, ctx.seed,
                                 needs)
        else:
            (T,) = saved
            grads = plan.backward(ops, grad_y2d, x2d, weight, A, B, core, kernel, row_scale, T, ctx.scaling, ctx.p,
                                  ctx.seed, ctx.order, ctx.activation, needs)
        dx, dA, dB, dC, dK = grads
        if dx is not None:
            dx = dx.reshape(x.shape)
        # The frozen-weight path is a plain linear layer: the same on every backend.
        dW = grad_y2d.T @ x2d if need_w else None
        db = grad_y2d.sum(0) if need_bias else None
        return dx, dW, db, dA, dB, dC, dK, None, None, None, None, None, None, None
