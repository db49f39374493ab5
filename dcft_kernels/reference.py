"""The obviously-right versions: build ΔW densely, then do one dense linear.

These are the ground truth every backend is tested against. They are slow on
purpose and import nothing from the rest of the package.

Conventions follow ``nn.Linear``: ``weight`` is ``out × in`` and
``y = x Wᵀ + b``. For DCFT, ΔW is the transposed convolution (stride = kernel
size d) of the small ``⌈out/d⌉ × ⌈in/d⌉`` matrix ``B·A`` with the ``d × d``
kernel, cropped to ``out × in``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dcft_delta_weight(A, B, kernel, out_features, in_features, scaling=1.0):
    """ΔW = scaling · ConvTranspose2d(B·A, kernel, stride=d), cropped to ``out × in``."""
    d = kernel.shape[0]
    small = B @ A  # ⌈out/d⌉ × ⌈in/d⌉
    delta = F.conv_transpose2d(small[None, None], kernel[None, None], stride=d)[0, 0]
    return scaling * delta[:out_features, :in_features]


def lora_delta_weight(A, B, scaling):
    """ΔW = scaling · B·A."""
    return scaling * (B @ A)


def delora_delta_weight(A, B, core, scaling):
    """ΔW = scaling · B·Σ·A."""
    return scaling * (B @ core @ A)


def structured_delta_weight(A, B, core, kernel, out_features, in_features, scaling=1.0):
    """The general ΔW = scaling · (B·C·A) ⊗ K, cropped; ``core``/``kernel`` may be None."""
    if core is not None:
        B = B @ core
    if kernel is None:
        return lora_delta_weight(A, B, scaling)[:out_features, :in_features]
    return dcft_delta_weight(A, B, kernel, out_features, in_features, scaling)


def structured_delta_linear(x, weight, bias, A, B, core=None, kernel=None, scaling=1.0, dropout_mask=None):
    """``y = x Wᵀ + b + dropout(x) ΔWᵀ`` with ΔW built densely.

    ``dropout_mask`` (same shape as ``x``) already holds the ``1/(1-p)`` scale
    of the kept elements; without it the adapter sees ``x`` itself, and the
    result is exactly ``F.linear(x, W + ΔW, b)``.
    """
    out_features, in_features = weight.shape
    delta = structured_delta_weight(A, B, core, kernel, out_features, in_features, scaling)
    if dropout_mask is None:
        return F.linear(x, weight + delta, bias)
    return F.linear(x, weight, bias) + F.linear(x * dropout_mask, delta)


def dcft_linear(x, weight, bias, A, B, kernel, scaling=1.0, dropout_mask=None):
    """Reference DCFT layer."""
    return structured_delta_linear(x, weight, bias, A, B, None, kernel, scaling, dropout_mask)


def lora_linear(x, weight, bias, A, B, scaling, dropout_mask=None):
    """Reference LoRA layer."""
    return structured_delta_linear(x, weight, bias, A, B, None, None, scaling, dropout_mask)


def delora_linear(x, weight, bias, A, B, core, scaling, dropout_mask=None):
    """Reference DeLoRA layer."""
    return structured_delta_linear(x, weight, bias, A, B, core, None, scaling, dropout_mask)


ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


def kron_delta_linear(x, weight, bias, A, B, core=None, kernel=None, scaling=1.0, dropout_mask=None,
                      order="dcft", row_scale=None, activation=None):
    """The general op densely, with ``torch.kron``, for either Kronecker order.

    ``order="dcft"``: ΔW = (B·C·A) ⊗ K; ``order="lokr"``: ΔW = K ⊗ (B·C·A); K is ``d_out × d_in``
    (rectangular allowed), ΔW cropped to ``out × in``, its rows scaled by ``row_scale``.
    By the mixed-product rule ΔW = E·S with the shrink S = A ⊗ I (or I ⊗ A) and the expand
    E = (B·C) ⊗ K (or K ⊗ (B·C)); ``activation`` (MPC_n) is applied between them, per token:
    ``y = x Wᵀ + b + scaling · σ(x Sᵀ) Eᵀ``. Without it this is ``F.linear(x, W + ΔW, b)``.
    """
    out_features, in_features = weight.shape
    K = torch.ones(1, 1, dtype=A.dtype, device=A.device) if kernel is None else kernel
    BC = B @ core if core is not None else B
    eye_in = torch.eye(K.shape[1], dtype=A.dtype, device=A.device)
    if order == "dcft":
        S, E = torch.kron(A, eye_in), torch.kron(BC, K)
    elif order == "lokr":
        S, E = torch.kron(eye_in, A), torch.kron(K, BC)
    else:
        raise ValueError(f"order must be 'dcft' or 'lokr', got {order!r}")
    S, E = S[:, :in_features], E[:out_features]
    if row_scale is not None:
        E = E * row_scale[:, None]
    x_adapter = x if dropout_mask is None else x * dropout_mask
    if activation is None:
        return F.linear(x, weight, bias) + scaling * F.linear(x_adapter, E @ S)
    return F.linear(x, weight, bias) + scaling * F.linear(ACTIVATIONS[activation](F.linear(x_adapter, S)), E)


def orthogonality_penalty(A, B, squared=True):
    """DCFT Eq. 4 on the r×r sides: ‖A·Aᵀ − I‖² + ‖Bᵀ·B − I‖² (Frobenius)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    terms = [torch.linalg.matrix_norm(A @ A.T - eye), torch.linalg.matrix_norm(B.T @ B - eye)]
    return sum(t**2 if squared else t for t in terms)
