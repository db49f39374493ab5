"""Backends of the one structured-delta op.

Each backend module provides the primitives that ``plan.py`` composes into the op's forward and
backward, over 2-D token-major tensors in the DCFT layout (feature ``i·d + j``)::

    shrink(v, M, d, scale, p, seed) -> (N, r, d)      T = scale · Mᵀ ⊛ drop(v)
    expand_(out, U, M, scale, p, seed)                 out += scale · drop(M ⊛ U), in place
    reduce(v, U, blocks, p, seed) -> (blocks, r)       Σ_n drop(v) ⊛ U
    round_once(x) -> bool                              fp16/bf16 computed in fp32 and rounded once

and may declare a fused override of the whole layer, for the calls where it fuses passes::

    fuses(x, A, kernel, order, activation, row_scale) -> bool
    forward(x, weight, bias, A, B, core, kernel, scaling, p, seed) -> (y, saved)
    backward(grad_y, x, weight, A, B, core, kernel, saved, scaling, p, seed, needs_grad) -> (dx, dA, dB, dC, dK)

where ``saved`` is the tuple of tensors its backward needs (``T``; the C++ CPU pass adds the dropout
keep-bits).

The weight and bias gradients are the same for every backend and live in ``autograd.py``.
"""
