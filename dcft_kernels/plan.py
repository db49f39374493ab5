"""What the structured-delta op computes, forward and backward, written once.

Every backend provides three primitives over 2-D token-major tensors, in the DCFT layout (feature
``i·d + j`` is block ``i``, position ``j`` within it; features past the tensor's width are zeros):

``shrink(v, M, d, scale, p, seed) -> (N, r, d)``
    ``T[n, r, j] = scale · Σ_i M[i, r] · drop(v)[n, i·d + j]``, in the accumulation dtype.
``expand_(out, U, M, scale, p, seed)``
    ``out[n, i·d + j] += scale · drop(Σ_r M[i, r] · U[n, r, j])`` in place (``d = U.shape[2]``).
``reduce(v, U, blocks, p, seed) -> (blocks, r)``
    ``Σ_n Σ_j drop(v)[n, i·d + j] · U[n, r, j]``, in U's dtype.

and ``round_once(x)``: whether half-precision inputs are computed in fp32 and rounded once (as a
dense ``F.linear(x, W + ΔW)`` does), so that ``x·Wᵀ`` or ``A·x`` alone may overflow fp16 where ``y``
does not. The plan below composes them; the per-token mix ``U = C·σ(T)·Kᵀ`` and its backward are
tiny batched products on ``(tokens, r, d)`` tensors, in torch for every backend.

The LoKr order, ``ΔW = K ⊗ (B·C·A)``, is the same plan on a view: with ``in = d_in · blocks``,
feature ``j·blocks + i`` of a token is feature ``i`` of row ``n·d_in + j`` of ``x.view(-1, blocks)``,
so the shrink is the d = 1 primitive on that view and T comes out ``(N, d_in, r)``, the transpose
of the DCFT order's. The dropout stream is indexed by flat position, which the view keeps. Dims that
do not divide are zero-padded first (a copy; PEFT's LoKr factorisation always divides).

A backend may declare a fused override of the whole op where it fuses passes the plan keeps apart
(the C++ CPU per-token pass, the Triton kernels with the mix in their epilogues): ``fuses(...)``
says for which calls, ``forward``/``backward`` compute them. Those cover the DCFT order with a square
kernel, no activation and no row scale, and are tested against the same reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import dropout_mask
from .reference import ACTIVATIONS

_HALF = (torch.float16, torch.bfloat16)


def kernel_dims(kernel):
    """``(d_out, d_in)`` of the kernel, ``(1, 1)`` when absent."""
    return tuple(kernel.shape) if kernel is not None else (1, 1)


def is_plain_dcft(order, kernel, activation, row_scale) -> bool:
    """The case the fused overrides cover: DCFT order, square (or no) kernel, no activation, no row scale."""
    return (order == "dcft" and activation is None and row_scale is None
            and (kernel is None or kernel.shape[0] == kernel.shape[1]))


# ---- the activation between the A and B products (MPC_n) -------------------------------------------

def _activate(T, activation):
    return T if activation is None else ACTIVATIONS[activation](T)


def _activation_grad(T, activation):
    """σ'(T), elementwise."""
    if activation == "tanh":
        return 1 - torch.tanh(T).square()
    if activation == "relu":
        return (T > 0).to(T.dtype)
    # exact (erf) GELU: Φ(T) + T·φ(T)
    return 0.5 * (1 + torch.erf(T / math.sqrt(2))) + T * torch.exp(-0.5 * T.square()) / math.sqrt(2 * math.pi)


# ---- the mix U = C·S·Kᵀ and its backward, per token on (N, r, d) ------------------------------------

def _mix(S, core, kernel):
    U = S if core is None else torch.matmul(core.to(S.dtype), S)
    return U if kernel is None else torch.matmul(U, kernel.to(S.dtype).T)


def _mix_backward(dU, S, core, kernel, need_s, need_c, need_k):
    """``dS = Cᵀ·dU·K``, ``dC = Σ_n (dU·K)·Sᵀ``, ``dK = Σ_n dUᵀ·(C·S)``."""
    dUK = dU if kernel is None else torch.matmul(dU, kernel.to(dU.dtype))
    dS = dUK if core is None else torch.matmul(core.to(dU.dtype).T, dUK)
    dC = torch.einsum("nrj,nsj->rs", dUK, S) if need_c else None
    dK = torch.einsum("nre,nrj->ej", dU, _mix(S, core, None)) if need_k else None
    return (dS if need_s else None), dC, dK


# ---- the two sides of a layer in either Kronecker order ---------------------------------------------

class _Side:
    """The features of x (or y) as the primitives see them: ``(N, F)`` itself for the DCFT order;
    for the LoKr order ``(N·d, blocks)``, K's index outermost, padded when ``F < d·blocks``."""

    def __init__(self, order, n_features, d, blocks):
        self.lokr = order == "lokr"
        self.F, self.d, self.blocks = n_features, d, blocks
        self.pad = d * blocks - n_features if self.lokr else 0

    def rows(self, t):
        if not self.lokr:
            return t
        return (F.pad(t, (0, self.pad)) if self.pad else t).reshape(t.shape[0] * self.d, self.blocks)

    def small_in(self, t):
        """Primitive-side (N·d, r, 1) -> the op's (N, r, d) (a view: T is transposed in the LoKr order)."""
        return t.reshape(t.shape[0] // self.d, self.d, t.shape[1]).transpose(1, 2) if self.lokr else t

    def small_out(self, t):
        """The op's (N, r, d) -> what the primitives take: (N·d, r, 1), contiguous."""
        return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], 1) if self.lokr else t.contiguous()

    def pre_dropped(self, p):
        """Padding moves elements, so a padded LoKr side applies the mask itself, before padding."""
        return self.pad > 0 and p > 0.0


def _mask(t, p, seed):
    return dropout_mask(t.shape, p, seed, device=t.device, dtype=t.dtype)


def _shrink(ops, side, v, M, scale, p, seed):
    if side.pre_dropped(p):
        v, p = v * _mask(v, p, seed), 0.0
    return side.small_in(ops.shrink(side.rows(v), M, 1 if side.lokr else side.d, scale, p, seed))


def _expand_(ops, side, out, U, M, scale, p, seed):
    """out += scale · drop(expand(U)), in place on ``out`` (N, F)."""
    small = side.small_out(U)
    if side.pad:
        delta = out.new_zeros(out.shape[0], side.d * side.blocks)
        ops.expand_(delta.view(delta.shape[0] * side.d, side.blocks), small, M, scale, 0.0, seed)
        delta = delta[:, : side.F]
        out.add_(delta * _mask(delta, p, seed) if p > 0.0 else delta)
        return
    ops.expand_(side.rows(out), small, M, scale, p, seed)  # a view of a contiguous out: in place


def _reduce(ops, side, v, U, p, seed):
    if side.pre_dropped(p):
        v, p = v * _mask(v, p, seed), 0.0
    return ops.reduce(side.rows(v), side.small_out(U), side.blocks, p, seed)


def _sides(order, x, weight, A, B, kernel):
    d_out, d_in = kernel_dims(kernel)
    return _Side(order, x.shape[1], d_in, A.shape[1]), _Side(order, weight.shape[0], d_out, B.shape[0])


# ---- the op -------------------------------------------------------------------------------------------

def _upcast(*tensors):
    return [t.float() if t is not None else None for t in tensors]


def forward(ops, x, weight, bias, A, B, core, kernel, row_scale, scaling, p, seed, order, activation):
    """``(y, T)`` for 2-D ``x``: ``y = x Wᵀ + b + s · row_scale ⊙ drop(x) ΔWᵀ`` and the saved
    ``T (N, r, d_in)`` in the accumulation dtype."""
    if x.dtype in _HALF and ops.round_once(x):
        y, T = forward(ops, *_upcast(x, weight, bias, A, B, core, kernel, row_scale), scaling, p, seed, order,
                       activation)
        return y.to(x.dtype), T
    x_side, y_side = _sides(order, x, weight, A, B, kernel)
    T = _shrink(ops, x_side, x, A.T, 1.0, p, seed)  # A·drop(X)
    U = _mix(_activate(T, activation), core, kernel)
    y = F.linear(x, weight, bias)
    if row_scale is None:
        _expand_(ops, y_side, y, U, B, scaling, 0.0, seed)
    else:
        delta = torch.zeros_like(y)
        _expand_(ops, y_side, delta, U, B, scaling, 0.0, seed)
        y.add_((delta * row_scale).to(y.dtype))
    return y, T


def backward(ops, grad_y, x, weight, A, B, core, kernel, row_scale, T, scaling, p, seed, order, activation,
             needs_grad):
    """``(dx, dA, dB, dC, dK)`` for ``needs_grad = (x, A, B, core, kernel)``; None where not needed."""
    if x.dtype in _HALF and ops.round_once(x):
        grads = backward(ops, *_upcast(grad_y, x, weight, A, B, core, kernel, row_scale), T, scaling, p, seed,
                         order, activation, needs_grad)
        return tuple(g.to(x.dtype) if g is not None else None for g in grads)
    need_x, need_a, need_b, need_c, need_k = needs_grad
    need_c, need_k = need_c and core is not None, need_k and kernel is not None
    x_side, y_side = _sides(order, x, weight, A, B, kernel)
    G = grad_y if row_scale is None else grad_y * row_scale
    dU = _shrink(ops, y_side, G, B, scaling, 0.0, seed)  # s·Bᵀ·G
    S = _activate(T, activation)
    dx = dA = dB = None
    if need_b:  # dB = s · Σ_n G·Uᵀ
        dB = _reduce(ops, y_side, G, _mix(S, core, kernel), 0.0, seed).mul_(scaling).to(B.dtype)
    dS, dC, dK = _mix_backward(dU, S, core, kernel, need_x or need_a, need_c, need_k)
    if need_x or need_a:
        dT = dS if activation is None else dS * _activation_grad(T, activation)
        if need_a:  # dA = Σ_n dT·drop(X)ᵀ
            dA = _reduce(ops, x_side, x, dT, p, seed).T.to(A.dtype)
        if need_x:  # dx = dy·W + drop(Aᵀ·dT)
            dx = grad_y @ weight
            _expand_(ops, x_side, dx, dT, A.T, 1.0, p, seed)
    return (dx, dA, dB, dC.to(core.dtype) if need_c else None, dK.to(kernel.dtype) if need_k else None)
