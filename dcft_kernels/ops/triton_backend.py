"""The structured-delta op in Triton: three small kernels around cuBLAS, never building ΔW.

Everything is expressed with two structured matrices built on the fly in
registers from the tiny factors (``c = r·d + j`` indexes the r·d columns of T):

* shrink  ``T[n, c] = Σ_k x[n, k] · S[c // d, k // d] · [k % d == c % d]``
  (``S = A`` for the forward's ``T = A·X``; ``S = Bᵀ`` for backward's ``dU = Bᵀ·G``),
* expand  ``y[n, m] += s · Σ_c T[n, c] · P[m // d, c // d] · K[m % d, c % d]``
  (``P = B·C`` with the kernel K in forward; ``P = Aᵀ`` with K = I for ``dx``),
* token reduction ``Q[c, f] = Σ_n L[n, c] · R[n, f]`` for the factor gradients, whose
  ``c % d == f % d`` entries summed over the block give ``dA`` and ``dB``.

Forward is ``y = F.linear(x, W, b)`` (cuBLAS) then shrink and expand-in-place;
``dx = dy·W`` (cuBLAS) then the same expand with the roles swapped. With
``GEMM_PATH = "fused"`` the expand instead seeds the accumulator of one Triton GEMM
(``triton_gemm.py``), so ``y`` and ``dx`` are written once. Only the fp32
``T`` (tokens × r·d) is saved; dropout is Philox from a seed (``tl.rand``), the
same stream ``dropout.py`` computes, so no mask is stored.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import torch_backend
from .triton_gemm import INTERPRET, block_c, configs, dot_precision, gemm_with_delta, structured_tile

# How x·Wᵀ (and dy·W) meet the delta: "cublas" runs cuBLAS, then adds the delta into the result
# in place; "fused" seeds the accumulator of one Triton GEMM with the delta, so the output is
# written once. Process-wide (forward and backward must agree); the benchmark measures both.
GEMM_PATH = os.environ.get("DCFT_KERNELS_TRITON_GEMM", "cublas")


def is_available() -> bool:
    """Real GPU kernels on CUDA, or Triton's CPU interpreter when TRITON_INTERPRET=1."""
    return INTERPRET or torch.cuda.is_available()


@triton.autotune(
    configs=configs({"BLOCK_N": 32, "BLOCK_K": 64},
                     [({"BLOCK_N": bn, "BLOCK_K": bk}, w, s)
                      for bn in (64, 128) for bk in (64, 128) for w, s in ((4, 3), (8, 4))]),
    key=["F", "RD", "D"],  # not N: varying token counts must not re-tune
)
@triton.jit
def _shrink_kernel(
    x_ptr, s_ptr, t_ptr, N, F, RD, seed, p, scale,
    stride_xn, stride_xk, stride_sr, stride_sb,
    D: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T[n, c] = scale · Σ_k drop(x)[n, k] · S[c // D, k // D] · [k % D == c % D] (fp32 out)."""
    pid_n, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_x = (rows[:, None] < N) & (ks[None, :] < F)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk, mask=in_x, other=0.0)
        if DROPOUT:
            offsets = rows[:, None].to(tl.int64) * F + ks[None, :]
            keep = tl.rand(seed, offsets) >= p
            x = tl.where(keep, x / (1.0 - p), 0.0).to(x.dtype)
        on_diag = (ks[:, None] % D == cols[None, :] % D) & (ks[:, None] < F) & (cols[None, :] < RD)
        s = tl.load(s_ptr + (cols[None, :] // D) * stride_sr + (ks[:, None] // D) * stride_sb, mask=on_diag,
                    other=0.0)
        acc = tl.dot(x, s.to(x.dtype), acc, input_precision=PRECISION)
    out = (rows[:, None] < N) & (cols[None, :] < RD)
    tl.store(t_ptr + rows[:, None] * RD + cols[None, :], acc * scale, mask=out)


@triton.autotune(
    configs=configs({"BLOCK_N": 32, "BLOCK_M": 64},
                     [({"BLOCK_N": bn, "BLOCK_M": bm}, w, s)
                      for bn in (64, 128) for bm in (64, 128, 256) for w, s in ((4, 3), (8, 3))]),
    key=["M", "RD", "D"],
)
@triton.jit
def _expand_kernel(
    y_ptr, t_ptr, p_ptr, k_ptr, N, M, RD, seed, drop_p, scale,
    stride_yn, stride_ym, stride_pm, stride_pr,
    D: tl.constexpr, HAS_K: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """y[n, m] += scale · mask · Σ_c T[n, c] · P[m // D, c // D] · K[m % D, c % D]  (K = I if not HAS_K)."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, RD, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        t = tl.load(t_ptr + rows[:, None] * RD + cs[None, :], mask=(rows[:, None] < N) & (cs[None, :] < RD),
                    other=0.0)
        tile = structured_tile(p_ptr, k_ptr, cs, ms, RD, M, stride_pm, stride_pr, D, HAS_K)
        acc = tl.dot(t, tile, acc, input_precision=PRECISION)
    acc = acc * scale
    if DROPOUT:
        offsets = rows[:, None].to(tl.int64) * M + ms[None, :]
        acc = tl.where(tl.rand(seed, offsets) >= drop_p, acc / (1.0 - drop_p), 0.0)
    out = (rows[:, None] < N) & (ms[None, :] < M)
    y_ptrs = y_ptr + rows[:, None] * stride_yn + ms[None, :] * stride_ym
    y = tl.load(y_ptrs, mask=out, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=out)


@triton.autotune(
    configs=configs({"BLOCK_N": 32, "BLOCK_F": 64},
                     [({"BLOCK_N": bn, "BLOCK_F": bf}, w, s)
                      for bn in (64, 128) for bf in (64, 128) for w, s in ((4, 3), (8, 4))]),
    key=["F", "RD"],
)
@triton.jit
def _token_reduce_kernel(
    l_ptr, r_ptr, q_ptr, N, F, RD, seed, p, tokens_per_split,
    stride_rn, stride_rf,
    BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Q[split, c, f] = Σ_{n in this split} L[n, c] · drop(R)[n, f]  (fp32; splits summed by the caller)."""
    pid_f, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
    n_start = pid_s * tokens_per_split
    n_stop = tl.minimum(n_start + tokens_per_split, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        in_n = ns < n_stop
        lt = tl.load(l_ptr + ns[None, :] * RD + cs[:, None], mask=in_n[None, :] & (cs[:, None] < RD), other=0.0)
        r = tl.load(r_ptr + ns[:, None] * stride_rn + fs[None, :] * stride_rf,
                    mask=in_n[:, None] & (fs[None, :] < F), other=0.0).to(tl.float32)
        if DROPOUT:
            offsets = ns[:, None].to(tl.int64) * F + fs[None, :]
            r = tl.where(tl.rand(seed, offsets) >= p, r / (1.0 - p), 0.0)
        acc = tl.dot(lt, r, acc, input_precision=PRECISION)
    q_ptrs = q_ptr + pid_s * RD * F + cs[:, None] * F + fs[None, :]
    tl.store(q_ptrs, acc, mask=(cs[:, None] < RD) & (fs[None, :] < F))


# ---- launchers -----------------------------------------------------------------------------------

def shrink(x, S, d, *, scale=1.0, p=0.0, seed=0):
    """(N, F) x and small S (r, ⌈F/d⌉) -> fp32 (N, r·d)."""
    N, F = x.shape
    RD = S.shape[0] * d
    t = torch.empty(N, RD, device=x.device, dtype=torch.float32)
    width_c = block_c(RD)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(RD, width_c))  # noqa: E731
    wrap_triton(_shrink_kernel)[grid](
        x, S, t, N, F, RD, seed, p, scale, x.stride(0), x.stride(1), S.stride(0), S.stride(1),
        D=d, BLOCK_C=width_c, DROPOUT=p > 0.0, PRECISION=dot_precision(x.dtype),
    )
    return t


def expand_(y, t, P, kernel, d, *, scale=1.0, p=0.0, seed=0):
    """y (N, M) += scale · drop(T ⊛ (P, K)) in place; P is (⌈M/d⌉, r), kernel (d, d) or None (= I)."""
    N, M = y.shape
    RD = t.shape[1]
    k = kernel if kernel is not None else t  # never read when HAS_K is False
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    wrap_triton(_expand_kernel)[grid](
        y, t, P, k, N, M, RD, seed, p, scale, y.stride(0), y.stride(1), P.stride(0), P.stride(1),
        D=d, HAS_K=kernel is not None, BLOCK_C=block_c(RD), DROPOUT=p > 0.0, PRECISION=dot_precision(y.dtype),
    )
    return y


def token_reduce(L, R, *, p=0.0, seed=0):
    """Q = Lᵀ · drop(R) over tokens: fp32 (RD, F) from L (N, RD) fp32 and R (N, F)."""
    N, RD = L.shape
    F = R.shape[1]
    # Split the token reduction so that skinny outputs still fill the GPU; partial sums, no atomics.
    splits = 1 if INTERPRET else max(1, min(64, N // 1024))
    q = torch.empty(splits, RD, F, device=R.device, dtype=torch.float32)
    tokens_per_split = triton.cdiv(N, splits)
    width_c = block_c(RD)
    grid = lambda meta: (triton.cdiv(F, meta["BLOCK_F"]), triton.cdiv(RD, width_c), splits)  # noqa: E731
    wrap_triton(_token_reduce_kernel)[grid](
        L, R, q, N, F, RD, seed, p, tokens_per_split, R.stride(0), R.stride(1),
        BLOCK_C=width_c, DROPOUT=p > 0.0, PRECISION=dot_precision(R.dtype),
    )
    return q.sum(0)


def _block_diagonal_sum(q, r, d, n_blocks):
    """(r·d, F) -> (r, n_blocks): entry [a, b] = Σ_j q[a·d + j, b·d + j]."""
    q = F.pad(q, (0, n_blocks * d - q.shape[1]))
    return q.view(r, d, n_blocks, d).diagonal(dim1=1, dim2=3).sum(-1)


def _mix(t, core, kernel, r, d, transpose):
    """Per token U = C·T·Kᵀ (or, with ``transpose``, Cᵀ·T·K) on the flattened (N, r·d) fp32 T."""
    if core is None and kernel is None:
        return t
    c = core.float() if core is not None else torch.eye(r, device=t.device)
    k = kernel.float() if kernel is not None else torch.eye(d, device=t.device)
    # flat U[(a, e)] = Σ_(b, j) T[(b, j)] · C[a, b] · K[e, j]  ⇒  U = T · kron(Cᵀ, Kᵀ)
    return t @ (torch.kron(c, k) if transpose else torch.kron(c.T, k.T))


# ---- the op, registered so torch.compile sees the kernels -----------------------------------------

@triton_op("dcft_kernels::triton_forward", mutates_args=())
def triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   B: torch.Tensor, core: torch.Tensor | None, kernel: torch.Tensor | None, scaling: float,
                   p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = 1 if kernel is None else kernel.shape[0]
    kernel = kernel.contiguous() if kernel is not None else None
    t = shrink(x, A, d, p=p, seed=seed)
    P = B @ core if core is not None else B
    if GEMM_PATH == "fused":
        return gemm_with_delta(x, weight.T, bias, t, P, kernel, d, scale=scaling), t
    y = F.linear(x, weight, bias)
    expand_(y, t, P, kernel, d, scale=scaling)
    return y, t


@triton_op("dcft_kernels::triton_backward", mutates_args=())
def triton_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, core: torch.Tensor | None, kernel: torch.Tensor | None, t: torch.Tensor,
                    scaling: float, p: float, seed: int, need_x: bool, need_a: bool, need_b: bool,
                    need_c: bool, need_k: bool) -> list[torch.Tensor]:
    r, n_in = A.shape
    n_out = B.shape[0]
    d = 1 if kernel is None else kernel.shape[0]
    kernel = kernel.contiguous() if kernel is not None else None
    grad_y = grad_y.contiguous()
    du = shrink(grad_y, B.T, d, scale=scaling)  # dU = s·Bᵀ·G, (N, r·d) fp32
    dx, dA, dB, dC, dK = (grad_y.new_empty(0) for _ in range(5))  # placeholders for grads not needed
    if need_b:
        u = _mix(t, core, kernel, r, d, transpose=False)
        dB = _block_diagonal_sum(token_reduce(u, grad_y), r, d, n_out).T.mul(scaling).to(B.dtype).contiguous()
    if need_c or need_k:
        du3, t3 = du.view(-1, r, d), t.view(-1, r, d)
        if need_c:
            duk = du3 @ kernel.float() if kernel is not None else du3
            dC = torch.einsum("nrj,nsj->rs", duk, t3).to(core.dtype)
        if need_k:
            ct = core.float() @ t3 if core is not None else t3
            dK = torch.einsum("nre,nrj->ej", du3, ct).to(kernel.dtype)
    if need_x or need_a:
        dt = _mix(du, core, kernel, r, d, transpose=True)  # dT = Cᵀ·dU·K
        if need_a:
            dA = _block_diagonal_sum(token_reduce(dt, x, p=p, seed=seed), r, d, n_in).to(A.dtype)
        if need_x and GEMM_PATH == "fused":
            dx = gemm_with_delta(grad_y, weight, None, dt, A.T, None, d, p=p, seed=seed)
        elif need_x:
            dx = grad_y @ weight
            expand_(dx, dt, A.T, None, d, p=p, seed=seed)
    return [dx, dA, dB, dC, dK]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _fallback_reason(x: torch.Tensor) -> str | None:
    """Why these kernels cannot take ``x`` (the torch backend then does, with a one-time warning)."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} (the kernels accumulate in fp32)"
    if x.device.type != "cuda" and not INTERPRET:
        return f"device {x.device.type} (Triton runs on CUDA, or on the CPU only under TRITON_INTERPRET=1)"
    return None


def _use_torch_instead(x: torch.Tensor) -> bool:
    reason = _fallback_reason(x)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"dcft_kernels: the Triton backend does not support {reason}; using the torch backend",
                      stacklevel=4)
    return reason is not None


def forward(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    if _use_torch_instead(x):
        return torch_backend.forward(x, weight, bias, A, B, core, kernel, scaling, p, seed)
    return triton_forward(x, weight, bias, A, B, core, kernel, scaling, p, seed)


def backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, needs_grad):
    if _use_torch_instead(x):
        return torch_backend.backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, needs_grad)
    outs = triton_backward(grad_y, x, weight, A, B, core, kernel, T, scaling, p, seed, *needs_grad)
    return tuple(out if flag else None for out, flag in zip(outs, needs_grad))


@triton_forward.register_fake
def _(x, weight, bias, A, B, core, kernel, scaling, p, seed):
    d = 1 if kernel is None else kernel.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0] * d, dtype=torch.float32)


@triton_backward.register_fake
def _(grad_y, x, weight, A, B, core, kernel, t, scaling, p, seed, need_x, need_a, need_b, need_c, need_k):
    def maybe(flag, like, *shape):
        return like.new_empty(*shape) if flag else grad_y.new_empty(0)

    return [maybe(need_x, grad_y, *x.shape), maybe(need_a, A, *A.shape), maybe(need_b, B, *B.shape),
            maybe(need_c, A, *core.shape) if core is not None else grad_y.new_empty(0),
            maybe(need_k, A, *kernel.shape) if kernel is not None else grad_y.new_empty(0)]
