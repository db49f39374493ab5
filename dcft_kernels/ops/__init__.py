"""Backends of the one structured-delta op.

Each backend module exposes the same two functions over 2-D inputs:

``forward(x, weight, bias, A, B, core, kernel, scaling, p, seed) -> (y, T)``
    ``y = x Wᵀ + b + scaling · drop(x) ΔWᵀ`` with ΔW = (B·C·A) ⊗ K cropped, and
    the small fp32 ``T = A · X`` (tokens × r × d) that backward needs.

``backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, needs_grad)``
    returns ``(dx, dA, dB, dC, dK)`` for ``needs_grad = (x, A, B, core, kernel)``
    flags; entries whose flag is False are None. The weight and bias gradients
    are the same for every backend and live in ``autograd.py``.
"""
