"""Adapter dropout from a seed: the same keep-mask on every backend.

The mask for element ``i`` of the flattened ``(tokens, in_features)`` input is
``rand(seed, i) >= p`` where ``rand`` is Triton's ``tl.rand`` (Philox-4x32,
10 rounds, uint32 → [0, 1)). This module computes it with plain torch integer
ops, so the torch and C++ backends and the Triton kernels drop exactly the same
elements, the mask is regenerated in backward instead of being stored, and
tests can hand the very same mask to ``reference.py``.
"""
from __future__ import annotations

import random

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # tl.rand's int32 → [0, 1) scale


def new_seed() -> int:
    """Draw a dropout seed: from torch's default generator in eager mode (so ``torch.manual_seed``
    fixes it); from Python's ``random`` under torch.compile, which draws it afresh on every call of
    the compiled code, where ``.item()`` would break the graph (seed ``random`` too, then)."""
    if torch.compiler.is_compiling():
        return random.randrange(2**31 - 1)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` for int64 ``offsets``, as float32 in [0, 1)."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        # 32×32-bit products wrap in int64 but keep their low 64 bits, which is all we need.
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _MASK32) ^ c1 ^ k0,
            prod_b & _MASK32,
            ((prod_a >> 32) & _MASK32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(signed < 0, ~signed, signed).to(torch.int32)
    return folded.to(torch.float32) * _UNIFORM_SCALE


def dropout_mask(shape, p: float, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The scaled keep-mask (``0`` or ``1/(1-p)``) for a contiguous input of ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    uniform = philox_uniform(seed, torch.arange(numel, device=device))
    keep = (uniform >= p).reshape(shape)
    return keep.to(dtype) / (1.0 - p)
