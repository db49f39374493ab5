"""The structured-delta op in plain PyTorch (einsum / matmul); runs on any device.

Never builds ΔW: the adapter costs ``r·(in + out) + r·d²`` multiply-adds a token.
The shrink reshapes ``x`` (one transient copy when d > 1), which the fused
Triton and C++ backends avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dropout import dropout_mask


def _blocks(t: torch.Tensor, n_blocks: int, d: int) -> torch.Tensor:
    """View a (tokens, features) tensor as (tokens, n_blocks, d), zero-padding the tail."""
    pad = n_blocks * d - t.shape[1]
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(t.shape[0], n_blocks, d)


def _dropped(x, p, seed):
    if p == 0.0:
        return x
    return x * dropout_mask(x.shape, p, seed, device=x.device, dtype=x.dtype)


def _acc(dtype):
    """Accumulation dtype of the small tensors: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _mix(T, core, kernel):
    """U = C · T · Kᵀ per token, in T's (accumulation) dtype."""
    if core is not None:
        T = core.to(T.dtype) @ T
    if kernel is not None:
        T = T @ kernel.to(T.dtype).T
    return T


_HALF = (torch.float16, torch.bfloat16)


def _upcast(*tensors):
    return [t.float() if t is not None else None for t in tensors]


def forward(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    if x.dtype in _HALF:
        # Accumulate in fp32 and round once, as a dense F.linear(x, W + ΔW) does: x·Wᵀ or T = A·x
        # alone may overflow fp16 where y does not.
        y, T = _forward(*_upcast(x, weight, bias, A, B, core, kernel), scaling, p, seed)
        return y.to(x.dtype), T
    return _forward(x, weight, bias, A, B, core, kernel, scaling, p, seed)


def _forward(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    d = 1 if kernel is None else kernel.shape[0]
    X = _blocks(_dropped(x, p, seed), A.shape[1], d)
    T = torch.einsum("ri,nid->nrd", A, X).to(_acc(x.dtype))
    U = _mix(T, core, kernel).to(x.dtype)
    delta = torch.einsum("or,nrd->nod", B, U).reshape(x.shape[0], B.shape[0] * d)[:, : weight.shape[0]]
    y = F.linear(x, weight, bias)
    y.add_(delta, alpha=scaling)
    return y, T


def backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, needs_grad):
    if x.dtype in _HALF:  # fp32 accumulation, one rounding (see forward)
        grads = _backward(*_upcast(grad_y, x, weight, A, B, core, kernel), T, scaling, p, seed, needs_grad)
        return tuple(g.to(x.dtype) if g is not None else None for g in grads)
    return _backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, needs_grad)


def _backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, needs_grad):
    need_x, need_a, need_b, need_c, need_k = needs_grad
    dtype = x.dtype
    d = 1 if kernel is None else kernel.shape[0]
    G = _blocks(grad_y, B.shape[0], d)
    acc = T.dtype
    dU = scaling * torch.einsum("or,nod->nrd", B, G).to(acc)

    dx = dA = dB = dC = dK = None
    if need_b:
        U = _mix(T, core, kernel)
        dB = scaling * torch.einsum("nod,nrd->or", G, U.to(dtype))
    if need_c:
        dUK = dU @ kernel.to(acc) if kernel is not None else dU
        dC = torch.einsum("nrj,nsj->rs", dUK, T).to(dtype)
    if need_k:
        CT = core.to(acc) @ T if core is not None else T
        dK = torch.einsum("nre,nrj->ej", dU, CT).to(dtype)
    if need_x or need_a:
        dT = core.to(acc).T @ dU if core is not None else dU
        if kernel is not None:
            dT = dT @ kernel.to(acc)
        dT = dT.to(dtype)
        mask = dropout_mask(x.shape, p, seed, device=x.device, dtype=dtype) if p > 0.0 else None
        if need_a:
            X = _blocks(x if mask is None else x * mask, A.shape[1], d)
            dA = torch.einsum("nrj,nij->ri", dT, X)
        if need_x:
            dx_adapter = torch.einsum("ri,nrj->nij", A, dT).reshape(x.shape[0], A.shape[1] * d)[:, : x.shape[1]]
            if mask is not None:
                dx_adapter = dx_adapter * mask
            dx = grad_y @ weight + dx_adapter
    return dx, dA, dB, dC, dK


_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


def general_linear(x, weight, bias, A, B, core, kernel, scaling, p, seed, order, row_scale, activation):
    """The op in either Kronecker order, with a rectangular ``d_out × d_in`` kernel, a per-output
    scale of ΔW's rows and an activation on T, in differentiable torch ops (autograd derives the
    backward; T, σ(T) and U, tokens × r × d each, are what it saves).

    ``order="dcft"``: per token ``X = x.view(⌈in/d_in⌉, d_in)``, ``T = A·X``, ``U = C·σ(T)·Kᵀ``,
    ``y += s·B·U``. ``order="lokr"`` (K sets the coarse blocks): ``X = x.view(d_in, ⌈in/d_in⌉)``,
    ``T = X·Aᵀ``, ``U = K·σ(T)·Cᵀ``, ``y += s·U·Bᵀ``. Both flattened and cropped to ``out``.
    """
    lead, x2d = x.shape[:-1], x.reshape(-1, x.shape[-1])
    acc = _acc(x.dtype)
    xa, A, B = _dropped(x2d, p, seed).to(acc), A.to(acc), B.to(acc)
    K = kernel.to(acc) if kernel is not None else torch.ones(1, 1, dtype=acc, device=x.device)
    C = core.to(acc) if core is not None else None
    act = _ACTIVATIONS[activation] if activation is not None else (lambda t: t)
    d_out, d_in = K.shape
    if order == "dcft":
        T = act(torch.einsum("ri,nij->nrj", A, _blocks(xa, A.shape[1], d_in)))
        U = (C @ T if C is not None else T) @ K.T
        delta = torch.einsum("or,nrk->nok", B, U)
    else:
        T = act(torch.einsum("nji,ri->njr", _blocks(xa, d_in, A.shape[1]), A))
        U = K @ (T @ C.T if C is not None else T)
        delta = torch.einsum("nkr,or->nko", U, B)
    delta = delta.reshape(x2d.shape[0], -1)[:, : weight.shape[0]]
    if row_scale is not None:
        delta = delta * row_scale.to(acc)
    y = F.linear(x2d, weight, bias).to(acc) + scaling * delta
    return y.to(x.dtype).reshape(*lead, weight.shape[0])
