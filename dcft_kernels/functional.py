"""Public functional API: one structured-delta op and its three adapters.

All compute ``y = x Wᵀ + b + scaling · drop(x) ΔWᵀ`` with
``ΔW = (B · C · A) ⊗ K`` cropped to ``out × in`` — without building ΔW.
"""
from __future__ import annotations

import torch

from . import reference
from .autograd import StructuredDeltaLinearFunction, resolve_backend
from .dropout import dropout_mask, new_seed
from .plan import is_plain_dcft
from .validation import check_structured_delta_args


def structured_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    core: torch.Tensor | None = None,
    kernel: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
    order: str = "dcft",
    row_scale: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The one op behind every adapter.

    Args:
        x: input ``(..., in)``; any leading dims, any strides.
        weight: frozen (or trainable) ``(out, in)`` weight; bias: ``(out,)`` or None.
        A: ``(r, ⌈in/d_in⌉)``; B: ``(⌈out/d_out⌉, r)``; core: ``(r, r)`` or None (identity);
            kernel: ``(d_out, d_in)`` or None (K = [[1]]).
        scaling: the scalar ``s`` in front of ΔW.
        dropout: probability of zeroing an element of ``x`` on the adapter branch only.
        seed: dropout seed (drawn from torch's generator when None); the same seed gives
            the same mask on every backend.
        backend: "auto" (Triton on CUDA when available, else the C++ extension, else torch),
            "torch", "triton", "cpp" or "reference" (dense ΔW; slow, for checking).
        order: ``"dcft"``: ΔW = (B·C·A) ⊗ K (the low-rank part sets the coarse blocks);
            ``"lokr"``: ΔW = K ⊗ (B·C·A) (K sets the coarse blocks; PEFT's LoKr).
        row_scale: ``(out,)`` factors on the rows of ΔW (LoKr's rank dropout), not differentiated.
        activation: None, "tanh", "relu" or "gelu" on T between the A and B products (MPC_n):
            ``U = C·σ(T)·Kᵀ``; ΔW then depends on the input and cannot be merged.

    Every backend computes every case. The C++ CPU pass and the Triton kernels fuse the mix into
    their token passes for the DCFT order with a square kernel and neither ``row_scale`` nor
    ``activation``; the other cases run the backend's shrink, expand and reduce primitives with the
    tiny per-token mix in torch between them (``plan.py``).
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        # Mixed precision: run in the autocast dtype like F.linear does; grads flow back in the
        # parameters' own dtype through the casts.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, A, B, core, kernel = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (x, weight, bias, A, B, core, kernel))
    check_structured_delta_args(x, weight, bias, A, B, core, kernel, scaling, dropout, order, row_scale, activation)
    name = resolve_backend(backend, x.device.type)
    p = float(dropout)
    if p > 0.0 and seed is None:
        seed = new_seed()
    seed = 0 if seed is None else int(seed)
    if row_scale is not None:
        row_scale = row_scale.detach()
    if name == "reference":
        mask = dropout_mask(x.shape, p, seed, x.device, x.dtype) if p > 0.0 else None
        if is_plain_dcft(order, kernel, activation, row_scale):
            return reference.structured_delta_linear(x, weight, bias, A, B, core, kernel, scaling, mask)
        return reference.kron_delta_linear(x, weight, bias, A, B, core, kernel, scaling, mask, order, row_scale,
                                           activation)
    return StructuredDeltaLinearFunction.apply(x, weight, bias, A, B, core, kernel, row_scale, float(scaling), p, seed,
                                               order, activation, name)


def dcft_linear(x, weight, bias, A, B, kernel, *, scaling=1.0, dropout=0.0, seed=None, backend="auto"):
    """DCFT: ``ΔW = scaling · ConvTranspose2d(B·A, kernel, stride=d)`` = ``scaling · (B·A) ⊗ kernel``."""
    return structured_delta_linear(
        x, weight, bias, A, B, None, kernel, scaling=scaling, dropout=dropout, seed=seed, backend=backend
    )


def lora_linear(x, weight, bias, A, B, *, scaling=1.0, dropout=0.0, seed=None, backend="auto"):
    """LoRA: ``ΔW = scaling · B·A`` with A ``(r, in)`` and B ``(out, r)``."""
    return structured_delta_linear(
        x, weight, bias, A, B, None, None, scaling=scaling, dropout=dropout, seed=seed, backend=backend
    )


def delora_linear(x, weight, bias, A, B, core, *, scaling=1.0, dropout=0.0, seed=None, backend="auto"):
    """DeLoRA (decomposition-based): ``ΔW = scaling · B·Σ·A`` with A, B frozen and Σ = ``core``."""
    return structured_delta_linear(
        x, weight, bias, A, B, core, None, scaling=scaling, dropout=dropout, seed=seed, backend=backend
    )


def structured_delta_weight(A, B, core=None, kernel=None, out_features=None, in_features=None, scaling=1.0,
                            order="dcft"):
    """Build ΔW densely (for merging and inspection): ``scaling · kron(B·C·A, K)`` (or
    ``kron(K, B·C·A)`` for ``order="lokr"``), cropped."""
    small = B @ core @ A if core is not None else B @ A
    # torch.kron views its inputs: a transposed (non-contiguous) kernel must be laid out first.
    if kernel is None:
        delta = small
    elif order == "lokr":
        delta = torch.kron(kernel.contiguous(), small.contiguous())
    else:
        delta = torch.kron(small.contiguous(), kernel.contiguous())
    out_features = delta.shape[0] if out_features is None else out_features
    in_features = delta.shape[1] if in_features is None else in_features
    return scaling * delta[:out_features, :in_features]
