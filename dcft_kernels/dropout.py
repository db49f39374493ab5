"""Adapter dropout from a seed: the same keep-mask on every backend.

The mask for element ``i`` of the flattened ``(tokens, in_features)`` input is
``u(seed, i) >= p``, where ``u(seed, i)`` is word ``i % 4`` of Philox-4x32-10 at
counter ``i // 4`` (Triton's ``tl.rand4x(seed, i // 4)``; uint32 → [0, 1) as
``tl.rand``): one Philox evaluation serves four consecutive elements, which
makes the CPU's mask four times cheaper than one evaluation per element. This
module computes it with plain torch integer ops, so the torch and C++ backends,
the CUDA kernels and the Triton kernels drop exactly the same elements, the
mask is regenerated in backward instead of being stored, and tests can hand
the very same mask to ``reference.py``.
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
    """The dropout uniform of each int64 element offset: word ``offset % 4`` of
    ``tl.rand4x(seed, offset // 4)``, as float32 in [0, 1)."""
    offsets = offsets.to(torch.int64)
    words = torch.stack(_philox_words(seed, offsets >> 2))
    return _uniform(torch.gather(words, 0, (offsets & 3)[None])[0])


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """uint32 (held in int64) → [0, 1) as Triton's ``uint_to_uniform_float``."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, ~signed, signed).to(torch.int32)
    return folded.to(torch.float32) * _UNIFORM_SCALE


def _philox_words(seed: int, counters: torch.Tensor):
    """The four uint32 words (in int64) of Philox-4x32-10 at int64 ``counters``, as Triton's
    ``randint4x``: counter low and high words in c0, c1, the seed as the key."""
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
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
    return c0, c1, c2, c3


def dropout_mask(shape, p: float, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The scaled keep-mask (``0`` or ``1/(1-p)``) for a contiguous input of ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    # Elements 4c .. 4c+3 are the four words of counter c: each counter evaluated once.
    words = _philox_words(seed, torch.arange((numel + 3) // 4, device=device))
    uniform = _uniform(torch.stack(words, dim=1).reshape(-1)[:numel])
    keep = (uniform >= p).reshape(shape)
    return keep.to(dtype) / (1.0 - p)
