"""The structured-delta op on Triton kernels (``triton_kernels.py``), never building ΔW.

Launches per layer call (the frozen ``x·Wᵀ`` and ``dy·W`` are cuBLAS):

* forward, 3: shrink (``T = A·drop(X)`` and the mixed ``U = C·T·Kᵀ``), ``x·Wᵀ + b``, expand ``y += s·B·U``;
* backward, at most 6: shrink of ``dy`` (``dT = Cᵀ·(s·Bᵀ·G)·K`` and the dC/dK partial sums),
  ``dy·W``, expand ``dx += drop(Aᵀ·dT)``, the dA and dB token reductions, one kernel that sums
  all factor-gradient partials and casts them.

With ``GEMM_PATH = "fused"`` the expand is folded into one Triton GEMM instead of cuBLAS + expand,
so ``y`` and ``dx`` are written once. Only the fp32 ``T`` (tokens × r·d) is saved; dropout is Philox
from a seed (``tl.rand``), the same stream ``dropout.py`` computes, so no mask is stored.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
import triton
from torch.library import triton_op, wrap_triton

from ..plan import is_plain_dcft
from . import torch_backend
from . import triton_kernels as tk
from .triton_kernels import INTERPRET, MAX_RD, MAX_RD_BLOCKED, dot_precision, rd_block, small_block

# How x·Wᵀ (and dy·W) meet the delta: "cublas" runs cuBLAS, then adds the delta into the result
# in place; "fused" seeds the accumulator of one Triton GEMM with the delta, so the output is
# written once. Process-wide (forward and backward must agree); the benchmark measures both.
GEMM_PATH = os.environ.get("DCFT_KERNELS_TRITON_GEMM", "cublas")
# Tokens per partial sum of the dA/dB reductions (more splits fill the GPU for skinny outputs).
TOKENS_PER_SPLIT = 1024
MAX_SPLITS = 64
# Most programs of the backward shrink, hence rows of dC/dK partial sums.
GRAM_SLOTS = 256


def is_available() -> bool:
    """Real GPU kernels on CUDA, or Triton's CPU interpreter when TRITON_INTERPRET=1."""
    return INTERPRET or torch.cuda.is_available()


# ---- constexprs of each launch: the launchers and the compile check (triton_aot.py) share them -----

def shrink_meta(d, r, dtype, *, has_c, has_k, backward, dropout, need_dc=False, need_dk=False):
    return dict(D=d, HAS_C=has_c, HAS_K=has_k, WRITE_U=(has_c or has_k) and not backward, TRANSPOSE=backward,
                NEED_DC=need_dc, NEED_DK=need_dk, DROPOUT=dropout, PRECISION=dot_precision(dtype),
                BLOCK_C=rd_block(r * d), BLOCK_R=small_block(r), BLOCK_D=small_block(d))


def expand_meta(d, r, dtype, *, dropout):
    return dict(D=d, DROPOUT=dropout, PRECISION=dot_precision(dtype), BLOCK_C=rd_block(r * d))


def factor_grad_meta(d, r, dtype, *, has_c, has_k, mix, dropout):
    return dict(D=d, D_POW2=triton.next_power_of_2(d), HAS_C=has_c, HAS_K=has_k, MIX=mix, DROPOUT=dropout,
                PRECISION=dot_precision(dtype), BLOCK_C=rd_block(r * d),
                BLOCK_R=rd_block(r * d) if d == 1 else small_block(r))


def gemm_meta(d, r, dtype, *, has_bias, dropout, has_delta=True):
    return dict(D=d, HAS_BIAS=has_bias, HAS_DELTA=has_delta, DROPOUT=dropout, PRECISION=dot_precision(dtype),
                BLOCK_C=rd_block(r * d))


# ---- launchers -------------------------------------------------------------------------------------

def _expand_(y, u, P, d, *, scale, p=0.0, seed=0):
    """y (N, M) += scale · drop(U ⊛ P) in place; P is (⌈M/d⌉, r)."""
    N, M = y.shape
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    wrap_triton(tk.expand_kernel)[grid](
        y, u, P, N, M, u.shape[1], seed, p, scale, y.stride(0), y.stride(1), P.stride(0), P.stride(1),
        **expand_meta(d, P.shape[1], y.dtype, dropout=p > 0.0))


def _gemm_with_delta(a, b, bias, u, P, d, *, scale, p=0.0, seed=0):
    """``a (M, K) · b (K, N) + bias + scale · drop(U ⊛ P)`` -> new (M, N); b may be a transposed view.
    With ``u`` None: the plain GEMM of the same kernel."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    has_delta = u is not None
    u = u if has_delta else out
    P = P if has_delta else b
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(tk.gemm_with_delta_kernel)[grid](
        a, b, bias if bias is not None else out, u, P, out, M, N, K, u.shape[1] if has_delta else 1, seed, p,
        scale, a.stride(0), a.stride(1), b.stride(0), b.stride(1), P.stride(0), P.stride(1),
        **gemm_meta(d, P.shape[1] if has_delta else 1, a.dtype, has_bias=bias is not None, dropout=p > 0.0,
                    has_delta=has_delta))
    return out


def plain_gemm(a, b, bias=None):
    """``a · b + bias`` by the fused GEMM kernel with the delta off: what the delta costs on top."""
    return _gemm_with_delta(a, b, bias, None, None, 1, scale=1.0)


def _splits(n_tokens: int) -> int:
    return max(1, min(MAX_SPLITS, triton.cdiv(n_tokens, TOKENS_PER_SPLIT)))


def _factor_grad(out, L, R, core, kernel, d, r, *, mix, scale=1.0, p=0.0, seed=0):
    """Partial sums into ``out`` (splits, r, ⌈F/d⌉), which may be a strided view (dB's transpose)."""
    N, F = R.shape
    n_blocks = triton.cdiv(F, d)
    splits = out.shape[0]
    grid = lambda meta: (triton.cdiv(n_blocks, meta["BLOCK_B"]), splits)  # noqa: E731
    wrap_triton(tk.factor_grad_kernel)[grid](
        L, R, core if core is not None else L, kernel if kernel is not None else L, out,
        N, F, L.shape[1], n_blocks, seed, p, scale, triton.cdiv(N, splits),
        R.stride(0), R.stride(1), out.stride(0), out.stride(1), out.stride(2),
        **factor_grad_meta(d, r, R.dtype, has_c=core is not None, has_k=kernel is not None, mix=mix,
                           dropout=p > 0.0))


def _flat_grad_sizes(r, n_in, n_out, d, need_a, need_b, need_c, need_k):
    """Sizes of dA, dB, dC, dK in the one flat gradient buffer (0 for those not needed)."""
    return (r * n_in if need_a else 0, n_out * r if need_b else 0, r * r if need_c else 0, d * d if need_k else 0)


# ---- the op, registered so torch.compile sees the kernels -----------------------------------------

@triton_op("dcft_kernels::triton_forward", mutates_args=())
def triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   B: torch.Tensor, core: torch.Tensor | None, kernel: torch.Tensor | None, scaling: float,
                   p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, n_feat = x.shape
    r = A.shape[0]
    d = 1 if kernel is None else kernel.shape[0]
    mix = core is not None or kernel is not None
    t = torch.empty(N, r * d, device=x.device, dtype=torch.float32)
    u = torch.empty_like(t) if mix else t
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(tk.shrink_kernel)[grid](
        x, A, core if core is not None else t, kernel if kernel is not None else t, t, u, t, t, t, t,
        N, n_feat, r * d, seed, p, 1.0, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        **shrink_meta(d, r, x.dtype, has_c=core is not None, has_k=kernel is not None, backward=False,
                      dropout=p > 0.0))
    if GEMM_PATH == "fused":
        return _gemm_with_delta(x, weight.T, bias, u, B, d, scale=scaling), t
    y = F.linear(x, weight, bias)
    _expand_(y, u, B, d, scale=scaling)
    return y, t


@triton_op("dcft_kernels::triton_backward", mutates_args=())
def triton_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, core: torch.Tensor | None, kernel: torch.Tensor | None, t: torch.Tensor,
                    scaling: float, p: float, seed: int, need_x: bool, need_a: bool, need_b: bool,
                    need_c: bool, need_k: bool) -> list[torch.Tensor]:
    """Returns ``[dx, flat]``: ``flat`` holds dA, dB, dC, dK (those needed) end to end, in x's dtype."""
    N = x.shape[0]
    r, n_in = A.shape
    n_out = B.shape[0]
    d = 1 if kernel is None else kernel.shape[0]
    rd = r * d
    has_c, has_k = core is not None, kernel is not None
    need_c, need_k = need_c and has_c, need_k and has_k
    dx = grad_y.new_empty(0)
    sizes = _flat_grad_sizes(r, n_in, n_out, d, need_a, need_b, need_c, need_k)
    flat = grad_y.new_empty(sum(sizes))
    splits = _splits(N)
    s_a, s_b = (splits if need_a else 0), (splits if need_b else 0)
    ws = torch.empty(s_a * sizes[0] + s_b * sizes[1] + GRAM_SLOTS * (sizes[2] + sizes[3]), device=x.device,
                     dtype=torch.float32)
    ws_a, ws_b, ws_c, ws_k = torch.split(ws, [s_a * sizes[0], s_b * sizes[1], GRAM_SLOTS * sizes[2],
                                              GRAM_SLOTS * sizes[3]])
    count = torch.empty(1, device=x.device, dtype=torch.int32)  # programs of the shrink: rows of dC/dK partials
    unused = ws if ws.numel() else flat  # for pointer arguments a kernel variant never reads

    dt = None
    if need_x or need_a or need_c or need_k:
        dt = torch.empty(N, rd, device=x.device, dtype=torch.float32)
        n_blocks = lambda meta: triton.cdiv(N, meta["BLOCK_N"])  # noqa: E731
        grid = (lambda meta: (min(n_blocks(meta), GRAM_SLOTS),)) if (need_c or need_k) else \
            (lambda meta: (n_blocks(meta),))
        wrap_triton(tk.shrink_kernel)[grid](
            grad_y, B.T, core if has_c else dt, kernel if has_k else dt, dt, dt, t,
            ws_c if need_c else unused, ws_k if need_k else unused, count,
            N, grad_y.shape[1], rd, seed, 0.0, scaling,
            grad_y.stride(0), grad_y.stride(1), B.stride(1), B.stride(0),
            **shrink_meta(d, r, grad_y.dtype, has_c=has_c, has_k=has_k, backward=True, dropout=False,
                          need_dc=need_c, need_dk=need_k))
    if need_x and GEMM_PATH == "fused":
        dx = _gemm_with_delta(grad_y, weight, None, dt, A.T, d, scale=1.0, p=p, seed=seed)
    elif need_x:
        dx = grad_y @ weight
        _expand_(dx, dt, A.T, d, scale=1.0, p=p, seed=seed)
    if need_a:
        _factor_grad(ws_a.view(splits, r, n_in), dt, x, None, None, d, r, mix=False, p=p, seed=seed)
    if need_b:
        _factor_grad(ws_b.view(splits, n_out, r).transpose(1, 2), t, grad_y, core, kernel, d, r,
                     mix=has_c or has_k, scale=scaling)
    if flat.numel():
        block = 256
        wrap_triton(tk.sum_partials_kernel)[(triton.cdiv(flat.numel(), block),)](
            ws if ws.numel() else flat, flat, count, *sizes, s_a, s_b, GRAM_SLOTS,
            HAS_GRAM=need_c or need_k, BLOCK=block)
    return [dx, flat]


@triton_op("dcft_kernels::triton_shrink", mutates_args=())
def triton_shrink(v: torch.Tensor, M: torch.Tensor, d: int, scale: float, p: float, seed: int) -> torch.Tensor:
    """``T (N, r·d) = scale · Mᵀ ⊛ drop(v)``: the shrink kernel without its mix epilogue."""
    N, n_feat = v.shape
    rd = M.shape[1] * d
    t = torch.empty(N, rd, device=v.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(tk.shrink_kernel)[grid](
        v, M, t, t, t, t, t, t, t, t, N, n_feat, rd, seed, p, scale, v.stride(0), v.stride(1),
        M.stride(1), M.stride(0),
        **shrink_meta(d, M.shape[1], v.dtype, has_c=False, has_k=False, backward=False, dropout=p > 0.0))
    return t


@triton_op("dcft_kernels::triton_expand_", mutates_args=("out",))
def triton_expand_(out: torch.Tensor, u: torch.Tensor, M: torch.Tensor, d: int, scale: float, p: float,
                   seed: int) -> None:
    _expand_(out, u, M, d, scale=scale, p=p, seed=seed)


@triton_op("dcft_kernels::triton_reduce", mutates_args=())
def triton_reduce(v: torch.Tensor, u: torch.Tensor, blocks: int, d: int, p: float, seed: int) -> torch.Tensor:
    """``(blocks, r)``: the factor-gradient kernel per token split, the splits summed after."""
    r = u.shape[1] // d
    splits = _splits(v.shape[0])
    ws = torch.empty(splits, r, blocks, device=v.device, dtype=torch.float32)
    _factor_grad(ws, u, v, None, None, d, r, mix=False, p=p, seed=seed)
    return ws.sum(0).T.contiguous()


@triton_shrink.register_fake
def _(v, M, d, scale, p, seed):
    return v.new_empty(v.shape[0], M.shape[1] * d, dtype=torch.float32)


@triton_expand_.register_fake
def _(out, u, M, d, scale, p, seed):
    return None


@triton_reduce.register_fake
def _(v, u, blocks, d, p, seed):
    return u.new_empty(blocks, u.shape[1] // d)


@triton_forward.register_fake
def _(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    d = 1 if kernel is None else kernel.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0] * d, dtype=torch.float32)


@triton_backward.register_fake
def _(grad_y, x, weight, A, B, core, kernel, t, scaling, p, seed, need_x, need_a, need_b, need_c, need_k):
    d = 1 if kernel is None else kernel.shape[0]
    sizes = _flat_grad_sizes(A.shape[0], A.shape[1], B.shape[0], d, need_a, need_b, need_c and core is not None,
                             need_k and kernel is not None)
    return [grad_y.new_empty(x.shape) if need_x else grad_y.new_empty(0), grad_y.new_empty(sum(sizes))]


# ---- dispatch --------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _fallback_reason(x: torch.Tensor) -> str | None:
    """Why these kernels cannot take ``x`` (the torch backend then does, with a one-time warning)."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} (the kernels accumulate in fp32)"
    if x.device.type != "cuda" and not INTERPRET:
        return f"device {x.device.type} (Triton runs on CUDA, or on the CPU only under TRITON_INTERPRET=1)"
    return None


def _kernels_cannot(x: torch.Tensor, r: int, d: int) -> bool:
    """Whether these kernels cannot take the call (the torch backend's primitives then do)."""
    if r * d > (MAX_RD if d == 1 else MAX_RD_BLOCKED) or x.shape[0] == 0 or x.shape[1] == 0:
        # r·d beyond one register tile (the torch backend's batched GEMMs fit it better), or nothing to
        # launch for: silently, as the results are the same.
        return True
    reason = _fallback_reason(x)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"dcft_kernels: the Triton backend does not support {reason}; using the torch backend",
                      stacklevel=5)
    return reason is not None


def _small(t):
    """The kernels index the tiny core and kernel as contiguous matrices."""
    return t.contiguous() if t is not None else None


# ---- the fused override: the mix in the kernels' epilogues ------------------------------------------

def fuses(x, A, kernel, order, activation, row_scale) -> bool:
    d = 1 if kernel is None else kernel.shape[0]
    return is_plain_dcft(order, kernel, activation, row_scale) and not _kernels_cannot(x, A.shape[0], d)


def forward(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    """(y, (T,)): the mask is regenerated from the seed in backward."""
    y, T = triton_forward(x, weight, bias, A, B, _small(core), _small(kernel), scaling, p, seed)
    return y, (T,)


def backward(grad_y, x, weight, A, B, core, kernel, saved, scaling, p, seed, needs_grad):
    (T,) = saved
    need_x, need_a, need_b, need_c, need_k = needs_grad
    need_c, need_k = need_c and core is not None, need_k and kernel is not None
    dx, flat = triton_backward(grad_y, x, weight, A, B, _small(core), _small(kernel), T, scaling, p,
                               seed, need_x, need_a, need_b, need_c, need_k)
    d = 1 if kernel is None else kernel.shape[0]
    r, n_in = A.shape
    sizes = _flat_grad_sizes(r, n_in, B.shape[0], d, need_a, need_b, need_c, need_k)
    dA, dB, dC, dK = torch.split(flat, sizes)
    return (dx if need_x else None, dA.view(A.shape) if need_a else None, dB.view(B.shape) if need_b else None,
            dC.view(core.shape) if need_c else None, dK.view(kernel.shape) if need_k else None)


# ---- the plan's primitives ----------------------------------------------------------------------------

def round_once(x) -> bool:
    return False  # as cuBLAS's fp16 GEMM does: y = x·Wᵀ is rounded, then the delta is added


def shrink(v, M, d, scale, p, seed):
    if _kernels_cannot(v, M.shape[1], d):
        return torch_backend.shrink(v, M, d, scale, p, seed)
    return triton_shrink(v, M, d, scale, p, seed).view(v.shape[0], M.shape[1], d)


def expand_(out, U, M, scale, p, seed):
    if _kernels_cannot(out, U.shape[1], U.shape[2]) or U.dtype != torch.float32:
        return torch_backend.expand_(out, U, M, scale, p, seed)
    triton_expand_(out, U.reshape(U.shape[0], -1), M, U.shape[2], scale, p, seed)


def reduce(v, U, blocks, p, seed):
    r, d = U.shape[1], U.shape[2]
    if _kernels_cannot(v, r, d) or U.dtype != torch.float32:
        return torch_backend.reduce(v, U, blocks, p, seed)
    return triton_reduce(v, U.reshape(U.shape[0], -1), blocks, d, p, seed)
