"""The Triton kernels of the structured-delta op, their autotune configs and per-GPU pruning.

Notation (all on 2-D token-major tensors; ``c = a·D + e`` indexes the r·d columns of T):

* shrink  ``T[n, c] = scale · Σ_k drop(v)[n, k] · S[c // D, k // D] · [k % D == c % D]``, then in the
  epilogue the tiny per-token mix ``U = T · Mix`` (``Mix`` = kron of the core C and the kernel K, built
  in registers), and in backward the per-program partial sums of ``dC`` and ``dK``;
* expand  ``y[n, m] += scale · drop(Σ_c U[n, c] · P[m // D, c // D] · [m % D == c % D])``, in place;
* factor gradient ``G[a, b] = scale · Σ_n Σ_e L'[n, a·D + e] · drop(R)[n, b·D + e]`` per token split,
  with ``L' = L · Mixᵀ`` applied once to the summed tile (it is linear);
* a last small kernel sums the per-split partials of every factor gradient and casts them, in one launch;
* ``gemm_with_delta``: ``out = a·b + bias + scale · drop(U ⊛ P)``, the expand seeded into the
  accumulator of one GEMM so ``out`` is written once.

Every offset into a token-major tensor is 64-bit: tokens × features passes 2³¹ at real sizes.
``RD = r·d`` must fit one register tile (``MAX_RD``, or ``MAX_RD_BLOCKED`` when d > 1) for the
in-kernel mix and factor gradients; the backend sends larger ``r·d`` to the torch backend.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_RD = 64  # r·d with d = 1 (LoRA, DeLoRA)
MAX_RD_BLOCKED = 32  # r·d with d > 1: the block sums of the factor gradients need more registers

# Shared memory per block, in bytes, by compute capability major version (opt-in maximum).
SHARED_MEMORY_LIMIT = {8: 166_912, 9: 232_448, 10: 232_448}


# ---- sizes derived from the problem: the launchers and the compile check both use these ------------

def rd_block(rd: int) -> int:
    """Width of the register tile holding all r·d columns: a power of two ≥ 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rd))


def small_block(n: int) -> int:
    """Power of two ≥ max(n, 16), for the rank and kernel axes of the selector products."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting (TF32 when allowed); fp16/bf16 ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" \
            and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ---- autotune configs and pruning -----------------------------------------------------------------

def _element_size(dtype) -> int:
    """Bytes of a Triton or torch dtype (the autotuner hands tensors; the compile check strings)."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return 4 if "32" in str(dtype) else 2


def estimate_shared_memory(kernel: str, cfg: dict, meta: dict, in_bytes: int) -> int:
    """Upper estimate of a config's shared memory in bytes: the pipelined operand tiles of the main
    loop, plus the epilogue's fp32 tiles. The compile check asserts it is never below the real use."""
    stages = cfg["num_stages"]
    c = meta.get("BLOCK_C", 16)
    if kernel == "shrink":
        main = (cfg["BLOCK_N"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * c) * in_bytes * stages
        epilogue = (2 * c * c + 2 * cfg["BLOCK_N"] * c) * 4
    elif kernel == "expand":
        main = (cfg["BLOCK_N"] * c * 4 + c * cfg["BLOCK_M"] * 4) * min(stages, 2)
        epilogue = cfg["BLOCK_N"] * cfg["BLOCK_M"] * 4
    elif kernel == "factor_grad":
        width = cfg["BLOCK_B"] * meta["D_POW2"]
        main = (cfg["BLOCK_N"] * c * 4 + cfg["BLOCK_N"] * width * 4) * stages
        epilogue = (c * c + 2 * c * width + width * 16 + 2 * c * 16) * 4
    elif kernel == "gemm":
        main = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * in_bytes * stages
        epilogue = (cfg["BLOCK_M"] * c + c * cfg["BLOCK_N"]) * 4 + cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return main + epilogue


def _device_shared_memory_limit() -> int:
    if not torch.cuda.is_available():
        return SHARED_MEMORY_LIMIT[9]
    major = torch.cuda.get_device_capability()[0]
    return SHARED_MEMORY_LIMIT.get(major, torch.cuda.get_device_properties(0).shared_memory_per_block_optin)


def _elements_per_thread(kernel: str, cfg: dict, meta: dict) -> tuple[int, int]:
    """(elements of the widest loaded tile, elements of the accumulator) per thread."""
    threads = 32 * cfg["num_warps"]
    c = meta.get("BLOCK_C", 16)
    if kernel == "shrink":
        return cfg["BLOCK_N"] * cfg["BLOCK_K"] // threads, cfg["BLOCK_N"] * c // threads
    if kernel == "expand":
        return cfg["BLOCK_N"] * c // threads, cfg["BLOCK_N"] * cfg["BLOCK_M"] // threads
    if kernel == "factor_grad":
        width = cfg["BLOCK_B"] * meta["D_POW2"]
        return cfg["BLOCK_N"] * width // threads, c * width // threads
    if kernel == "gemm":
        loaded = max(cfg["BLOCK_M"], cfg["BLOCK_N"]) * cfg["BLOCK_K"]
        return loaded // threads, cfg["BLOCK_M"] * cfg["BLOCK_N"] // threads
    raise ValueError(f"unknown kernel {kernel!r}")


def fits(kernel: str, cfg: dict, meta: dict, in_bytes: int, limit: int) -> bool:
    """Whether a config can launch (shared memory within ``limit``) and stays in registers: Philox
    dropout costs a few registers per element, fp32 tiles (and the IEEE fp32 products of the epilogues)
    far more than 16-bit ones, so those variants take fewer elements a thread. The compile check
    (``triton_aot.py``) proves the configs these bounds keep spill-free."""
    if estimate_shared_memory(kernel, cfg, meta, in_bytes) > limit:
        return False
    loaded, acc = _elements_per_thread(kernel, cfg, meta)
    dropout = meta.get("DROPOUT", False)
    wide = in_bytes // 2  # 1 for fp16/bf16, 2 for fp32
    if kernel == "gemm":  # the dropout mask is drawn over the whole accumulator tile
        per_warp_count = 128 if cfg["num_warps"] >= 8 else 32
        return acc <= (16 if dropout else per_warp_count) // wide ** 3
    if kernel == "factor_grad" and cfg["BLOCK_B"] * meta["D_POW2"] > 128:
        return False  # the block sums of wide tiles cost more than they save
    gram = meta.get("NEED_DC") or meta.get("NEED_DK")
    epilogue = (meta.get("WRITE_U") or meta.get("TRANSPOSE") or meta.get("MIX")) and meta.get("BLOCK_C", 16) >= 32
    acc_limit = 32 if kernel == "expand" else 16 // (wide * wide) if epilogue else 64 // wide
    if wide == 2 and dropout and kernel == "shrink" and cfg["num_warps"] > 4:
        return False  # fp32 Philox tiles over 8 warps spill on sm_80 (the compile check shows it)
    if kernel == "shrink" and (cfg["num_stages"] == 1) != _unpipelined_only(meta, wide):
        return False  # the single-stage config serves exactly the case that spills when pipelined
    loaded_limit = 8 if wide == 2 else 8 if gram else 16 if dropout else 64
    return loaded <= loaded_limit and acc <= acc_limit


def _unpipelined_only(meta: dict, wide: int) -> bool:
    """The plan's shrink (no mix epilogue) with d > 1 and fp32 dropout stays in registers only with its
    loads unpipelined (ptxas on sm_80/90/100 shows 8-48 B of spills for every pipelined config)."""
    return (wide == 2 and meta.get("DROPOUT", False) and meta.get("D", 1) > 1
            and not (meta.get("HAS_C") or meta.get("HAS_K")))


def keep_configs(kernel: str, configs: list[dict], meta: dict, in_bytes: int, limit: int) -> list[dict]:
    """The configs the autotuner may try: those that ``fits``, or else the smallest one."""
    kept = [c for c in configs if fits(kernel, c, meta, in_bytes, limit)]
    return kept or [min(configs, key=lambda c: sum(_elements_per_thread(kernel, c, meta)))]


def _pruner(kernel: str, dtype_arg: str):
    """early_config_prune for ``kernel``: drop configs that cannot launch or would spill on this GPU,
    so the autotuner never benchmarks them."""
    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        as_dicts = [_as_dict(c) for c in configs]
        kept = keep_configs(kernel, as_dicts, meta, _element_size(meta[dtype_arg].dtype),
                            _device_shared_memory_limit())
        return [c for c, d in zip(configs, as_dicts) if d in kept]
    return prune


def _as_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# The GPU configs, as plain dicts (the compile check enumerates them). The first is the default,
# the one the interpreter runs. Chosen so that none spills registers on sm_80/90/100.
CONFIGS = {
    "shrink": [dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)]
    + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
       for bn, bk, w, s in ((32, 128, 8, 3), (128, 32, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (32, 64, 8, 3),
                            (32, 32, 4, 3), (32, 32, 4, 1))],
    "expand": [dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2)]
    + [dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=2)
       for bn, bm, w in ((64, 128, 8), (128, 128, 8), (32, 128, 4), (32, 256, 8))],
    "factor_grad": [dict(BLOCK_N=32, BLOCK_B=16, num_warps=8, num_stages=3)]
    + [dict(BLOCK_N=bn, BLOCK_B=bb, num_warps=w, num_stages=s)
       for bn, bb, w, s in ((64, 16, 8, 3), (32, 32, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 3),
                            (16, 16, 8, 3))],
    "gemm": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)]
    + [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
       for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                                (64, 64, 64, 4, 4), (64, 64, 32, 8, 3), (32, 32, 32, 8, 3))],
}
# The interpreter runs one small config (it cannot benchmark; tests swap in several to check tuning).
_INTERPRETER_CONFIGS = {
    "shrink": dict(BLOCK_N=32, BLOCK_K=64), "expand": dict(BLOCK_N=32, BLOCK_M=64),
    "factor_grad": dict(BLOCK_N=32, BLOCK_B=16), "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
}


def triton_configs(kernel: str) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config(_INTERPRETER_CONFIGS[kernel], num_warps=4, num_stages=1)]
    out = []
    for cfg in CONFIGS[kernel]:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        out.append(triton.Config(cfg, num_warps=warps, num_stages=stages))
    return out


# ---- shared pieces ---------------------------------------------------------------------------------

@triton.jit
def _dropout_uniform(seed, offsets):
    """The dropout uniform of each int64 element offset: word ``offset % 4`` of Philox at counter
    ``offset // 4`` (the stream of dropout.py, the C++ and CUDA backends)."""
    u0, u1, u2, u3 = tl.rand4x(seed, offsets >> 2)
    lane = offsets & 3
    return tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))


@triton.jit
def _core_weight(c_ptr, i, j, RD, D: tl.constexpr, HAS_C: tl.constexpr):
    """fp32 tile ``C[i // D, j // D]`` over flat r·d indices (``[i // D == j // D]`` without a core)."""
    live = (i[:, None] < RD) & (j[None, :] < RD)
    if HAS_C:
        return tl.load(c_ptr + (i[:, None] // D) * (RD // D) + j[None, :] // D, mask=live, other=0.0).to(tl.float32)
    return tl.where(live & (i[:, None] // D == j[None, :] // D), 1.0, 0.0)


@triton.jit
def _kernel_weight(k_ptr, i, j, RD, D: tl.constexpr, HAS_K: tl.constexpr):
    """fp32 tile ``K[i % D, j % D]`` over flat r·d indices (``[i % D == j % D]`` without a kernel)."""
    live = (i[:, None] < RD) & (j[None, :] < RD)
    if HAS_K:
        return tl.load(k_ptr + (i[:, None] % D) * D + j[None, :] % D, mask=live, other=0.0).to(tl.float32)
    return tl.where(live & (i[:, None] % D == j[None, :] % D), 1.0, 0.0)


@triton.jit
def _mix_tile(c_ptr, k_ptr, cs, RD, D: tl.constexpr, HAS_C: tl.constexpr, HAS_K: tl.constexpr,
              TRANSPOSE: tl.constexpr):
    """The per-token mix as one (r·d × r·d) fp32 tile: ``U = T · Mix`` is ``U = C·T·Kᵀ``, i.e.
    ``Mix[(b, f), (a, e)] = C[a, b] · K[e, f]``; with ``TRANSPOSE`` the tile is ``Mixᵀ``
    (``dT = dU · Mixᵀ`` is ``Cᵀ·dU·K``). An absent C or K is the identity."""
    if TRANSPOSE:
        return _core_weight(c_ptr, cs, cs, RD, D, HAS_C) * _kernel_weight(k_ptr, cs, cs, RD, D, HAS_K)
    return tl.trans(_core_weight(c_ptr, cs, cs, RD, D, HAS_C) * _kernel_weight(k_ptr, cs, cs, RD, D, HAS_K))


@triton.jit
def _expand_tile(p_ptr, cs, ms, RD, M, stride_pm, stride_pr, D: tl.constexpr):
    """fp32 tile ``[c, m] = P[m // D, c // D] · [m % D == c % D]`` turning U into the delta."""
    live = (cs[:, None] < RD) & (ms[None, :] < M) & (ms[None, :] % D == cs[:, None] % D)
    return tl.load(p_ptr + (ms[None, :] // D) * stride_pm + (cs[:, None] // D) * stride_pr, mask=live,
                   other=0.0).to(tl.float32)


@triton.jit
def _selector(i, j, D: tl.constexpr):
    """fp32 0/1 tile ``[i // D == j]``: sums groups of D consecutive indices with one tl.dot."""
    return tl.where(i[:, None] // D == j[None, :], 1.0, 0.0)


# ---- kernels ---------------------------------------------------------------------------------------

@triton.autotune(configs=triton_configs("shrink"), key=["F", "RD", "D"],  # not N: batches must not re-tune
                 prune_configs_by={"early_config_prune": _pruner("shrink", "v_ptr")})
@triton.jit
def shrink_kernel(
    v_ptr, s_ptr, c_ptr, k_ptr, t_ptr, u_ptr, saved_t_ptr, dc_ptr, dk_ptr, count_ptr,
    N, F, RD, seed, p, scale,
    stride_vn, stride_vk, stride_sr, stride_sb,
    D: tl.constexpr, HAS_C: tl.constexpr, HAS_K: tl.constexpr, WRITE_U: tl.constexpr, TRANSPOSE: tl.constexpr,
    NEED_DC: tl.constexpr, NEED_DK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: ``T = A·drop(X)`` -> t_ptr and ``U = T·Mix`` -> u_ptr (when ``WRITE_U``).
    Backward (``TRANSPOSE``): ``dU = s·Bᵀ·G``, ``dT = dU·Mixᵀ`` -> t_ptr, and this program's share of
    ``dC = Σ dU K Tᵀ`` and ``dK = Σ dUᵀ C T`` (from the saved T) -> row ``program`` of dc_ptr / dk_ptr;
    program 0 stores the number of programs (rows) in count_ptr for the kernel that sums them.

    Each program walks token blocks ``program, program + programs, ...``: with the dC/dK partials
    the launcher caps the programs, so the partial rows stay few whatever the token count."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    if NEED_DC:
        gram_c = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        sel_r = _selector(cols, tl.arange(0, BLOCK_R), D)  # [c // D == a]
        w_k = _kernel_weight(k_ptr, cols, cols, RD, D, HAS_K)  # dC[a, b] = Σ_(e, j) Σ_n dU T · K[e, j]
    if NEED_DK:
        gram_k = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        sel_d = tl.where(cols[:, None] % D == tl.arange(0, BLOCK_D)[None, :], 1.0, 0.0)  # [c % D == e]
        w_c = _core_weight(c_ptr, cols, cols, RD, D, HAS_C)  # dK[e, j] = Σ_(a, b) Σ_n dU T · C[a, b]
    if HAS_C or HAS_K:
        mix = _mix_tile(c_ptr, k_ptr, cols, RD, D, HAS_C, HAS_K, TRANSPOSE)
    for block in range(pid, tl.cdiv(N, BLOCK_N), programs):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            in_v = (rows[:, None] < N) & (ks[None, :] < F)
            v = tl.load(v_ptr + rows64[:, None] * stride_vn + ks[None, :] * stride_vk, mask=in_v, other=0.0)
            if DROPOUT:
                keep = _dropout_uniform(seed, rows64[:, None] * F + ks[None, :]) >= p
                v = tl.where(keep, v / (1.0 - p), 0.0).to(v.dtype)
            on_diag = (ks[:, None] % D == cols[None, :] % D) & (ks[:, None] < F) & (cols[None, :] < RD)
            s = tl.load(s_ptr + (cols[None, :] // D) * stride_sr + (ks[:, None] // D) * stride_sb, mask=on_diag,
                        other=0.0)
            acc = tl.dot(v, s.to(v.dtype), acc, input_precision=PRECISION)
        acc = acc * scale
        out = (rows[:, None] < N) & (cols[None, :] < RD)
        t_offsets = rows64[:, None] * RD + cols[None, :]
        if NEED_DC or NEED_DK:
            gram = tl.dot(tl.trans(acc), tl.load(saved_t_ptr + t_offsets, mask=out, other=0.0),
                          input_precision=PRECISION)  # [(a, e), (b, j)] = Σ_n dU[n, (a, e)] · T[n, (b, j)]
            if NEED_DC:
                gram_c += tl.dot(tl.trans(sel_r), tl.dot(gram * w_k, sel_r, input_precision=PRECISION),
                                 input_precision=PRECISION)
            if NEED_DK:
                gram_k += tl.dot(tl.trans(sel_d), tl.dot(gram * w_c, sel_d, input_precision=PRECISION),
                                 input_precision=PRECISION)
        if WRITE_U or TRANSPOSE:
            if not TRANSPOSE:
                tl.store(t_ptr + t_offsets, acc, mask=out)  # T, saved for backward
            if HAS_C or HAS_K:
                acc = tl.dot(acc, mix, input_precision=PRECISION)
            tl.store(u_ptr + t_offsets, acc, mask=out)  # U (forward) or dT (backward)
        else:
            tl.store(t_ptr + t_offsets, acc, mask=out)
    if NEED_DC:
        rr = tl.arange(0, BLOCK_R)
        n_r = RD // D
        tl.store(dc_ptr + pid * n_r * n_r + rr[:, None] * n_r + rr[None, :], gram_c,
                 mask=(rr[:, None] < n_r) & (rr[None, :] < n_r))
    if NEED_DK:
        dd = tl.arange(0, BLOCK_D)
        tl.store(dk_ptr + pid * D * D + dd[:, None] * D + dd[None, :], gram_k,
                 mask=(dd[:, None] < D) & (dd[None, :] < D))
    if NEED_DC or NEED_DK:
        if pid == 0:
            tl.store(count_ptr, programs)


@triton.autotune(configs=triton_configs("expand"), key=["M", "RD", "D"],
                 # The kernel adds into y: every config the autotuner tries must start from the same y.
                 restore_value=["y_ptr"],
                 prune_configs_by={"early_config_prune": _pruner("expand", "y_ptr")})
@triton.jit
def expand_kernel(
    y_ptr, u_ptr, p_ptr, N, M, RD, seed, drop_p, scale,
    stride_yn, stride_ym, stride_pm, stride_pr,
    D: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``y[n, m] += scale · drop(Σ_c U[n, c] · P[m // D, c // D] · [m % D == c % D])`` in place."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.arange(0, BLOCK_C)
    u = tl.load(u_ptr + rows64[:, None] * RD + cs[None, :], mask=(rows[:, None] < N) & (cs[None, :] < RD),
                other=0.0)
    acc = tl.dot(u, _expand_tile(p_ptr, cs, ms, RD, M, stride_pm, stride_pr, D), input_precision=PRECISION)
    acc = acc * scale
    if DROPOUT:
        acc = tl.where(_dropout_uniform(seed, rows64[:, None] * M + ms[None, :]) >= drop_p, acc / (1.0 - drop_p), 0.0)
    out = (rows[:, None] < N) & (ms[None, :] < M)
    y_ptrs = y_ptr + rows64[:, None] * stride_yn + ms[None, :] * stride_ym
    y = tl.load(y_ptrs, mask=out, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=out)


@triton.autotune(configs=triton_configs("factor_grad"), key=["F", "RD", "D"],
                 prune_configs_by={"early_config_prune": _pruner("factor_grad", "r_ptr")})
@triton.jit
def factor_grad_kernel(
    l_ptr, r_ptr, c_ptr, k_ptr, out_ptr, N, F, RD, NB, seed, p, scale, tokens_per_split,
    stride_rn, stride_rf, stride_os, stride_oa, stride_ob,
    D: tl.constexpr, D_POW2: tl.constexpr, HAS_C: tl.constexpr, HAS_K: tl.constexpr, MIX: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """``out[split, a, b] = scale · Σ_(n in split) Σ_e L'[n, a·D + e] · drop(R)[n, b·D + e]`` for the
    ``BLOCK_B`` blocks ``b`` of this program, with ``L' = L · Mix`` (``MIX``) or L.

    A program's columns start at a multiple of D, so its blocks are its own: no atomics."""
    pid_b, pid_s = tl.program_id(0), tl.program_id(1)
    BLOCK_F: tl.constexpr = BLOCK_B * D_POW2
    fl = tl.arange(0, BLOCK_F)
    fs = pid_b * (BLOCK_B * D) + fl
    in_f = (fl < BLOCK_B * D) & (fs < F)
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
    n_start = pid_s * tokens_per_split
    n_stop = tl.minimum(n_start + tokens_per_split, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        ns64 = ns.to(tl.int64)
        in_n = ns < n_stop
        lt = tl.load(l_ptr + ns64[None, :] * RD + cs[:, None], mask=in_n[None, :] & (cs[:, None] < RD), other=0.0)
        r = tl.load(r_ptr + ns64[:, None] * stride_rn + fs[None, :] * stride_rf,
                    mask=in_n[:, None] & in_f[None, :], other=0.0)
        if DROPOUT:
            r = tl.where(_dropout_uniform(seed, ns64[:, None] * F + fs[None, :]) >= p, r / (1.0 - p), 0.0)
        acc = tl.dot(lt, r.to(tl.float32), acc, input_precision=PRECISION)
    if MIX:  # Σ_n (L·Mix)ᵀ R = Mixᵀ · Σ_n Lᵀ R
        acc = tl.dot(_mix_tile(c_ptr, k_ptr, cs, RD, D, HAS_C, HAS_K, True), acc, input_precision=PRECISION)
    bs = tl.arange(0, BLOCK_B)
    if D > 1:  # keep the e == e' entries, then sum each D×D block with two 0/1 products
        acc = tl.where(cs[:, None] % D == fl[None, :] % D, acc, 0.0)
        acc = tl.dot(acc, _selector(fl, bs, D), input_precision=PRECISION)
        acc = tl.dot(tl.trans(_selector(cs, tl.arange(0, BLOCK_R), D)), acc, input_precision=PRECISION)
    a_idx = tl.arange(0, BLOCK_R)
    b_idx = pid_b * BLOCK_B + bs
    ptrs = out_ptr + pid_s * stride_os + a_idx[:, None] * stride_oa + b_idx[None, :] * stride_ob
    tl.store(ptrs, acc * scale, mask=(a_idx[:, None] < RD // D) & (b_idx[None, :] < NB))


@triton.jit
def sum_partials_kernel(ws_ptr, out_ptr, count_ptr, n0, n1, n2, n3, s0, s1, gram_slots, HAS_GRAM: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``out[i] = Σ_s ws_seg[s, i]`` for four segments laid end to end (dA, dB, dC, dK partials):
    segment g holds ``n_g`` outputs, as an (rows, n_g) block of the fp32 ``ws``. dA and dB have
    ``s0`` and ``s1`` rows; dC and dK ``gram_slots`` rows of which the first ``*count_ptr`` (written by
    the shrink kernel) are filled. Summed in fp32, cast once to the output dtype."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e1, e2, e3 = n0, n0 + n1, n0 + n1 + n2
    live = idx < e3 + n3
    gram_rows = tl.load(count_ptr) if HAS_GRAM else 0
    seg_start = tl.where(idx < e1, 0, tl.where(idx < e2, e1, tl.where(idx < e3, e2, e3)))
    numel = tl.where(idx < e1, n0, tl.where(idx < e2, n1, tl.where(idx < e3, n2, n3)))
    rows = tl.where(idx < e1, s0, tl.where(idx < e2, s1, gram_rows))
    ws_base = tl.where(idx < e1, 0, tl.where(idx < e2, s0 * n0, tl.where(idx < e3, s0 * n0 + s1 * n1,
                                                                       s0 * n0 + s1 * n1 + gram_slots * n2)))
    local = idx - seg_start
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, tl.maximum(tl.maximum(s0, s1), gram_rows)):
        acc += tl.load(ws_ptr + ws_base + s * numel + local, mask=live & (s < rows), other=0.0)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.autotune(configs=triton_configs("gemm"), key=["N", "K", "RD", "D"],  # not M (tokens)
                 prune_configs_by={"early_config_prune": _pruner("gemm", "a_ptr")})
@triton.jit
def gemm_with_delta_kernel(
    a_ptr, b_ptr, bias_ptr, u_ptr, p_ptr, out_ptr, M, N, K, RD, seed, drop_p, scale,
    stride_am, stride_ak, stride_bk, stride_bn, stride_pm, stride_pr,
    D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = a · b + bias + scale · drop(U ⊛ P)``: the delta seeds the accumulator (one K-step of
    width r·d), so ``out`` is written once. Serves the forward (a = x, b = Wᵀ, P = B) and dx
    (a = dy, b = W, P = Aᵀ, dropout). Without ``HAS_DELTA`` it is the plain GEMM (for the benchmark)."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)  # grouped ordering: neighbouring programs share rows of a, for L2
    first_m = group * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_size
    pid_n = (pid % (GROUP_M * n_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cs = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DELTA:
        u = tl.load(u_ptr + rows64[:, None] * RD + cs[None, :], mask=(rows[:, None] < M) & (cs[None, :] < RD),
                    other=0.0)
        acc = tl.dot(u, _expand_tile(p_ptr, cs, cols, RD, N, stride_pm, stride_pr, D), acc,
                     input_precision=PRECISION)
        acc = acc * scale
        if DROPOUT:
            acc = tl.where(_dropout_uniform(seed, rows64[:, None] * N + cols[None, :]) >= drop_p, acc / (1.0 - drop_p),
                           0.0)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out)
