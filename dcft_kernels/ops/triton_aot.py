"""Compile every Triton kernel of the package for real GPUs, without one.

``triton.compile`` builds PTX and a cubin for a target architecture on any machine; the bundled
``ptxas -v`` reports registers and spills. For each kernel, config, dtype and target this gives the
shared memory, registers and spill bytes, so that a kernel that cannot launch (too much shared
memory) or would crawl (spills) is caught before any GPU sees it. The constexprs come from the
same ``*_meta`` functions the launchers use.

    python -m dcft_kernels.ops.triton_aot            # the quick matrix, as a table
    python -m dcft_kernels.ops.triton_aot --full     # every config of every shape class
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from . import triton_backend as tb
from . import triton_kernels as tk

TARGETS = (80, 90, 100)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Shape classes the launchers produce: name -> (kernel, meta builder(dtype), pointer kinds).
# A pointer kind is "data" (the input dtype), "f32" (T, U, partial sums) or "i32".
_SHAPES = {
    "shrink fwd DCFT d=8 r=1 dropout": ("shrink", lambda dt: tb.shrink_meta(
        8, 1, dt, has_c=False, has_k=True, backward=False, dropout=True)),
    "shrink fwd r·d=32 core+kernel": ("shrink", lambda dt: tb.shrink_meta(
        4, 8, dt, has_c=True, has_k=True, backward=False, dropout=True)),
    "shrink bwd DCFT d=8 r=1 dK": ("shrink", lambda dt: tb.shrink_meta(
        8, 1, dt, has_c=False, has_k=True, backward=True, dropout=False, need_dk=True)),
    "shrink bwd r·d=32 dC+dK": ("shrink", lambda dt: tb.shrink_meta(
        4, 8, dt, has_c=True, has_k=True, backward=True, dropout=False, need_dc=True, need_dk=True)),
    "shrink bwd LoRA r=64": ("shrink", lambda dt: tb.shrink_meta(
        1, 64, dt, has_c=False, has_k=False, backward=True, dropout=False)),
    "expand DCFT d=8 r=1": ("expand", lambda dt: tb.expand_meta(8, 1, dt, dropout=False)),
    "expand dx r·d=32 dropout": ("expand", lambda dt: tb.expand_meta(4, 8, dt, dropout=True)),
    "factor_grad dA DCFT d=8 r=1 dropout": ("factor_grad", lambda dt: tb.factor_grad_meta(
        8, 1, dt, has_c=False, has_k=True, mix=False, dropout=True)),
    "factor_grad dB r·d=32 mix": ("factor_grad", lambda dt: tb.factor_grad_meta(
        4, 8, dt, has_c=True, has_k=True, mix=True, dropout=False)),
    "factor_grad dA LoRA r=64 dropout": ("factor_grad", lambda dt: tb.factor_grad_meta(
        1, 64, dt, has_c=False, has_k=False, mix=False, dropout=True)),
    "factor_grad dB d=3 r=5 mix": ("factor_grad", lambda dt: tb.factor_grad_meta(
        3, 5, dt, has_c=True, has_k=True, mix=True, dropout=False)),
    "shrink plan d=6 r=4 dropout (no mix)": ("shrink", lambda dt: tb.shrink_meta(
        6, 4, dt, has_c=False, has_k=False, backward=False, dropout=True)),
    "factor_grad plan d=6 r=4 dropout (no mix)": ("factor_grad", lambda dt: tb.factor_grad_meta(
        6, 4, dt, has_c=False, has_k=False, mix=False, dropout=True)),
    "sum_partials": ("sum_partials", lambda dt: dict(HAS_GRAM=True, BLOCK=256)),
    "gemm fwd DCFT d=8 r=1 bias": ("gemm", lambda dt: tb.gemm_meta(8, 1, dt, has_bias=True, dropout=False)),
    "gemm dx r·d=32 dropout": ("gemm", lambda dt: tb.gemm_meta(4, 8, dt, has_bias=False, dropout=True)),
}
_QUICK_SHAPES = ("shrink fwd r·d=32 core+kernel", "shrink bwd r·d=32 dC+dK", "expand dx r·d=32 dropout",
                 "factor_grad dB r·d=32 mix", "factor_grad dA LoRA r=64 dropout",
                 "shrink plan d=6 r=4 dropout (no mix)", "sum_partials",
                 "gemm dx r·d=32 dropout")

_JIT = {"shrink": tk.shrink_kernel, "expand": tk.expand_kernel, "factor_grad": tk.factor_grad_kernel,
        "sum_partials": tk.sum_partials_kernel, "gemm": tk.gemm_with_delta_kernel}
_F32_POINTERS = {"t_ptr", "u_ptr", "saved_t_ptr", "dc_ptr", "dk_ptr", "l_ptr", "out_ptr_f32", "ws_ptr"}
_FLOAT_SCALARS = {"p", "scale", "drop_p"}


@dataclass(frozen=True)
class Variant:
    shape: str
    kernel: str
    config: tuple  # sorted (name, value) pairs, num_warps and num_stages included
    dtype: str
    target: int

    def config_dict(self) -> dict:
        return dict(self.config)


@dataclass
class Result:
    variant: Variant
    shared: int
    registers: int
    spill_bytes: int
    error: str = ""


def _signature(kernel: str, fn, meta: dict, dtype: torch.dtype, config: dict) -> dict:
    data = "*" + _TRITON_TYPE[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in meta or name in config:
            sig[name] = "constexpr"
        elif name == "count_ptr":
            sig[name] = "*i32"
        elif name == "out_ptr":  # the factor-gradient partials are fp32; the other outputs are data
            sig[name] = "*fp32" if kernel == "factor_grad" else data
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _F32_POINTERS else data
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(full: bool = False, targets=TARGETS, dtypes=DTYPES) -> list[Variant]:
    """The quick matrix (each kernel's heaviest shape class, default and largest config), or every
    config of every shape class with ``full``."""
    out = []
    for shape, (kernel, build) in _SHAPES.items():
        if not full and shape not in _QUICK_SHAPES:
            continue
        for dtype in dtypes:
            for target in targets:
                for cfg in _configs(kernel, build(dtype), dtype, target, full):
                    out.append(Variant(shape, kernel, tuple(sorted(cfg.items())), _TRITON_TYPE[dtype], target))
    return out


def _configs(kernel, meta, dtype, target, full):
    """The configs the autotuner keeps on ``target`` (all, or the default and the largest)."""
    if kernel == "sum_partials":
        return [dict(num_warps=4, num_stages=1)]
    kept = tk.keep_configs(kernel, tk.CONFIGS[kernel], meta, dtype.itemsize, tk.SHARED_MEMORY_LIMIT[target // 10])
    if full or len(kept) <= 2:
        return kept
    largest = max(kept[1:], key=lambda c: tk.estimate_shared_memory(kernel, c, meta, dtype.itemsize))
    return [kept[0], largest]


def pruned_count(full: bool = False) -> int:
    """How many (shape class, config, dtype, target) combinations the pruning removes."""
    n = 0
    for shape, (kernel, build) in _SHAPES.items():
        if kernel == "sum_partials" or (not full and shape not in _QUICK_SHAPES):
            continue
        for dtype in DTYPES:
            for target in TARGETS:
                n += len(tk.CONFIGS[kernel]) - len(_configs(kernel, build(dtype), dtype, target, True))
    return n


def may_be_picked(v: Variant) -> bool:
    """Whether the autotuner's pruning keeps this config on this target (then it must not spill)."""
    if v.kernel == "sum_partials":
        return True
    dtype = {name: dt for dt, name in _TRITON_TYPE.items()}[v.dtype]
    meta = _SHAPES[v.shape][1](dtype)
    limit = tk.SHARED_MEMORY_LIMIT[v.target // 10]
    return v.config_dict() in tk.keep_configs(v.kernel, tk.CONFIGS[v.kernel], meta, dtype.itemsize, limit)


def _ptxas_stats(ptx: str, target: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(target).path, "-v", f"--gpu-name={sm_arch_from_capability(target)}", src,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_variant(v: Variant, ir: str | None = None):
    """Compile one variant; returns a Result (or the named IR's text when ``ir`` is given)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    dtype = {name: dt for dt, name in _TRITON_TYPE.items()}[v.dtype]
    meta = _SHAPES[v.shape][1](dtype)
    cfg = v.config_dict()
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    fn = _JIT[v.kernel]
    while not isinstance(fn, JITFunction):  # the JITFunction under the autotuner
        fn = fn.fn
    constexprs = {**meta, **cfg}
    src = ASTSource(fn, _signature(v.kernel, fn, meta, dtype, cfg), constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", v.target, 32), options=options)
    except Exception as exc:  # a compile error is a result to report, not a crash of the table
        return Result(v, 0, 0, 0, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if ir is not None:
        return compiled.asm[ir]
    registers, spills = _ptxas_stats(compiled.asm["ptx"], v.target)
    return Result(v, compiled.metadata.shared, registers, spills)


def compile_all(vs: list[Variant], workers: int | None = None) -> list[Result]:
    workers = workers or max(1, min(len(vs), os.cpu_count() or 1))
    if workers == 1:
        return [compile_variant(v) for v in vs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_variant, vs))


def table(results: list[Result]) -> str:
    from tabulate import tabulate

    rows = []
    for r in results:
        v = r.variant
        cfg = " ".join(f"{k}={val}" for k, val in v.config)
        limit = tk.SHARED_MEMORY_LIMIT[v.target // 10]
        status = r.error or ("pruned here" if not may_be_picked(v) else
                             "SPILLS" if r.spill_bytes else "TOO MUCH SHARED MEMORY" if r.shared > limit else "ok")
        rows.append([v.shape, cfg, v.dtype, f"sm_{v.target}", r.shared, r.registers, r.spill_bytes, status])
    return tabulate(rows, headers=["kernel", "config", "dtype", "target", "shared B", "registers", "spill B",
                                   "status"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every config of every shape class")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    results = compile_all(variants(full=args.full), args.workers)
    print(table(results))
    bad = [r for r in results if r.error or (may_be_picked(r.variant) and (
        r.spill_bytes or r.shared > tk.SHARED_MEMORY_LIMIT[r.variant.target // 10]))]
    print(f"\n{len(results)} variants, {sum(not may_be_picked(r.variant) for r in results)} pruned on their "
          f"target, {len(bad)} failing")


if __name__ == "__main__":
    main()
