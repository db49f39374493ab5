"""Orthogonality regularisers on the r×r sides of the adapter factors.

Shapes here are ours: ``A`` is ``(r, ·)`` and ``B`` is ``(·, r)``, so the r×r
Gram matrices are ``A·Aᵀ`` and ``Bᵀ·B``. The DCFT paper (Eq. 4) writes them
``AᵀA`` and ``BBᵀ`` in its own, transposed, shapes.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import full


def _frobenius(m: torch.Tensor, squared: bool) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(m)
    return norm**2 if squared else norm


def _eye(r, like):
    return torch.eye(r, dtype=like.dtype, device=like.device)


def orthogonality_penalty(A: torch.Tensor, B: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """DCFT Eq. 4 / MPC_o (Si et al. Eq. 25): ``‖A·Aᵀ − I‖_F² + ‖Bᵀ·B − I‖_F²``.

    ``squared=False`` gives the unsquared norms, as the DCFT authors' code uses.
    """
    r = A.shape[0]
    return _frobenius(A @ A.T - _eye(r, A), squared) + _frobenius(B.T @ B - _eye(r, B), squared)


def mpc_d_penalty(A: torch.Tensor, B: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """MPC_d (Si et al. Eq. 26): orthogonality on one factor, only diagonality on the other.

    In Si et al.'s shapes the orthogonal factor is the ``(n × r)`` one, which is our ``B``:
    ``‖Bᵀ·B − I‖_F² + ‖A·Aᵀ − diag(A·Aᵀ)‖_F²``.
    """
    gram_a = A @ A.T
    off_diagonal = gram_a - torch.diag_embed(torch.diagonal(gram_a))
    return _frobenius(B.T @ B - _eye(B.shape[1], B), squared) + _frobenius(off_diagonal, squared)


def _trainable_factor_modules(model: nn.Module):
    """Adapter modules whose A and B are both trained (DCFT, LoRA; not DeLoRA's frozen ones)."""
    from .modules import AdaptedLinear

    for module in model.modules():
        if isinstance(module, AdaptedLinear) and all(isinstance(t, nn.Parameter) for t in (module.A, module.B)):
            yield module


def orthogonality_loss(model: nn.Module, squared: bool = True, reduction: str = "sum", kind: str = "orthogonal"):
    """Sum (or mean) of the regulariser over every adapter of ``model`` with trainable A and B.

    ``kind="orthogonal"`` (DCFT Eq. 4 / MPC_o) or ``"mpc_d"``. The DCFT authors train with
    ``0.1 * orthogonality_loss(model, squared=False, reduction="mean")`` (0.3 on RTE/STS-B);
    the kernel is never regularised. Under FSDP2 every rank calls it (sharded factors are gathered).
    """
    penalty = {"orthogonal": orthogonality_penalty, "mpc_d": mpc_d_penalty}.get(kind)
    if penalty is None:
        raise ValueError(f"kind must be 'orthogonal' or 'mpc_d', got {kind!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    terms = [penalty(full(m.A), full(m.B), squared) for m in _trainable_factor_modules(model)]
    if not terms:
        raise ValueError("model has no adapter with trainable A and B to regularise")
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total
