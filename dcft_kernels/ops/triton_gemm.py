"""Triton pieces shared by the structured-delta kernels, and the fused "GEMM + delta" kernel.

``structured_tile`` builds, in registers, the (BLOCK_C × BLOCK_M) tile of the matrix
``M[c, m] = P[m // d, c // d] · K[m % d, c % d]`` (K = I when absent) that turns the
small per-token ``T`` (tokens × r·d) into the delta's contribution ``T · M``.

``gemm_with_delta`` computes ``out = a · b + bias + mask ⊙ (scale · T · M)`` in one kernel:
the accumulator of each output tile is seeded with the delta (one extra K-step of width
r·d) before the main loop over ``a · b``, so ``out`` is written once and ΔW never exists.
It serves the forward (``a = x``, ``b = Wᵀ``, ``P = B·C``) and the input gradient
(``a = dy``, ``b = W``, ``P = Aᵀ``, K = I, dropout mask) alike.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(interpret_config, gpu_configs):
    """Autotune configs; more than one fails without a GPU driver, so one fixed config in the interpreter."""
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=4)]
    return [triton.Config(c, num_warps=w, num_stages=s) for c, w, s in gpu_configs]


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def block_c(rd: int) -> int:
    """Width of the r·d blocks: ≥ 16 so tl.dot compiles on NVIDIA GPUs (the interpreter would
    accept less), ≤ 64 to bound registers."""
    return min(max(16, triton.next_power_of_2(rd)), 64)


@triton.jit
def structured_tile(p_ptr, k_ptr, cs, ms, RD, M, stride_pm, stride_pr, D: tl.constexpr, HAS_K: tl.constexpr):
    """fp32 tile M[c, m] = P[m // D, c // D] · K[m % D, c % D] for columns ``cs`` and rows ``ms``."""
    live = (cs[:, None] < RD) & (ms[None, :] < M)
    if HAS_K:
        kval = tl.load(k_ptr + (ms[None, :] % D) * D + cs[:, None] % D, mask=live, other=0.0).to(tl.float32)
    else:
        live = live & (ms[None, :] % D == cs[:, None] % D)
        kval = 1.0
    pval = tl.load(p_ptr + (ms[None, :] // D) * stride_pm + (cs[:, None] // D) * stride_pr, mask=live,
                   other=0.0).to(tl.float32)
    return pval * kval


_GEMM_CONFIGS = [({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, w, s)
                 for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                                          (128, 128, 64, 8, 4), (64, 256, 32, 4, 4), (128, 64, 32, 4, 4))]


@triton.autotune(
    configs=configs({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, _GEMM_CONFIGS),
    key=["N", "K", "RD", "D"],  # not the token count M: varying batches must not re-tune
)
@triton.jit
def _gemm_with_delta_kernel(
    a_ptr, b_ptr, bias_ptr, t_ptr, p_ptr, k_ptr, out_ptr, M, N, K, RD, seed, drop_p, scale,
    stride_am, stride_ak, stride_bk, stride_bn, stride_pm, stride_pr,
    D: tl.constexpr, HAS_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: neighbouring programs share rows of `a`, for L2 reuse.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_size
    pid_n = (pid % (GROUP_M * n_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    # Seed the accumulator with the delta: scale · T · M (masked by dropout), one K-step of width r·d.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, RD, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        t = tl.load(t_ptr + rows[:, None] * RD + cs[None, :], mask=(rows[:, None] < M) & (cs[None, :] < RD),
                    other=0.0)
        tile = structured_tile(p_ptr, k_ptr, cs, cols, RD, N, stride_pm, stride_pr, D, HAS_K)
        acc = tl.dot(t, tile, acc, input_precision=PRECISION)
    acc = acc * scale
    if DROPOUT:
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        acc = tl.where(tl.rand(seed, offsets) >= drop_p, acc / (1.0 - drop_p), 0.0)

    # The main loop: acc += a · b.
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out)


def gemm_with_delta(a, b, bias, t, P, kernel, d, *, scale=1.0, p=0.0, seed=0):
    """``a (M, K) · b (K, N) + bias + mask ⊙ (scale · T ⊛ (P, kernel))`` -> new (M, N) tensor.

    ``b`` may be a transposed view (``weight.T``); strides are passed, nothing is copied.
    """
    M, K = a.shape
    N = b.shape[1]
    RD = t.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    k = kernel if kernel is not None else t  # never read when HAS_K is False
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(_gemm_with_delta_kernel)[grid](
        a, b, bias if bias is not None else out, t, P, k, out, M, N, K, RD, seed, p, scale,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), P.stride(0), P.stride(1),
        D=d, HAS_K=kernel is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c(RD), DROPOUT=p > 0.0,
        PRECISION=dot_precision(a.dtype),
    )
    return out
