"""The main job: a side-by-side benchmark of adapted linear layers.

Every row gets the same frozen weight, the same input and the same output
gradient; each row's forward output and input gradient is first checked against
``reference.py`` and a row that does not match is reported, never timed.

Rows are timed in rounds (``paired_timing.py``): each round runs every row once in a shuffled
order, and a row's ratio to the frozen ``nn.Linear`` is taken within the round. The table gives
the median paired ratio with its 95% interval; where the interval holds 1.0 (or the ratio is
below 1, impossible for a layer that wraps the Linear) it says "within noise".

    dcft-bench                                   # cpu-small on CPU, llama7b on GPU
    dcft-bench --preset llama7b -o benchmarks/results/h100
    dcft-bench --rows dcft lora -o out           # only rows naming DCFT or LoRA, and the baseline
    dcft-bench --params                          # trainable-parameter report
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .autograd import is_available, resolve_backend
from .paired_timing import paired_ratios, run_rounds
from .modules import AdaptedLinear, DCFTLinear, DeLoRALinear, LoKrLinear, LoRALinear
from .params import MODEL_SHAPES, PAPER_DEBERTA_V3_BASE, count_adapter_parameters

PRESETS = {  # name -> list of (tokens, in_features, out_features)
    "tiny": [(64, 64, 48)],
    "cpu-small": [(2048, 1024, 1024), (2048, 1024, 2816)],
    "cpu-large": [(2048, 1024, 1024), (2048, 4096, 4096)],
    "llama7b": [(8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096)],
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative error (to the reference's magnitude) above which a row is refused.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class Case:
    """One row: a layer to time and the dense reference it must agree with."""

    name: str
    layer: Callable | None  # x -> y; None when unavailable
    reference: Callable | None = None  # x -> y, built densely by reference.py
    params: list = field(default_factory=list)  # trainable tensors (their grads are part of fwd+bwd)
    note: str = ""
    setting: Callable = contextlib.nullcontext  # entered around every call, backward included
    dropout: float = 0.0  # checked against the reference in eval mode (dropout off), timed in train mode


@dataclass
class Row:
    """One row of results.json; ``ratio*`` are fwd+bwd over the frozen nn.Linear's, paired by round."""

    shape: str
    case: str
    status: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    ratio: float | None = None
    ratio_lo: float | None = None
    ratio_hi: float | None = None
    verdict: str | None = None
    fwd_ratio: float | None = None
    fwd_ratio_lo: float | None = None
    fwd_ratio_hi: float | None = None
    rounds: int | None = None
    fwd_bwd_ms_q20: float | None = None
    fwd_bwd_ms_q80: float | None = None
    tokens_per_s: float | None = None
    extra_saved_mb: float | None = None
    peak_extra_mb: float | None = None  # CUDA only: the allocator's peak during fwd+bwd beyond y, dx, grads
    trainable_params: int | None = None


# ---- the rows ------------------------------------------------------------------------------

class NaiveDCFT(nn.Module):
    """DCFT as the authors' code does it: build ΔWᵀ with conv_transpose2d every forward,
    then add ``dropout(x) @ ΔWᵀ`` as a second full-size GEMM."""

    def __init__(self, adapted: DCFTLinear):
        super().__init__()
        self.adapted = adapted
        self.dropout = nn.Dropout(adapted.dropout) if adapted.dropout else nn.Identity()

    def forward(self, x):
        m = self.adapted
        delta_t = reference.dcft_delta_weight(m.A, m.B, m.kernel, m.out_features, m.in_features, m.scaling).T
        return F.linear(x, m.weight, m.bias) + self.dropout(x) @ delta_t


class MergedDenseDCFT(NaiveDCFT):
    """DCFT trained through a dense ``F.linear(x, W + ΔW)``: builds ΔW and W + ΔW every step."""

    def forward(self, x):
        m = self.adapted
        delta = reference.dcft_delta_weight(m.A, m.B, m.kernel, m.out_features, m.in_features, m.scaling)
        return F.linear(x, m.weight + delta, m.bias)


def _randomize(module: AdaptedLinear, generator: torch.Generator):
    """Non-zero adapter values (the same for every row built from the same generator state)."""
    with torch.no_grad():
        for t in module.factor_tensors().values():
            t.copy_(torch.randn(t.shape, generator=generator) * 0.1)
    return module


@contextlib.contextmanager
def _fused_triton_gemm():
    from .ops import triton_backend

    previous, triton_backend.GEMM_PATH = triton_backend.GEMM_PATH, "fused"
    try:
        yield
    finally:
        triton_backend.GEMM_PATH = previous


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def _peft_layer(base: nn.Linear, config):
    """PEFT's adapter layer around ``base`` (its weight shared, as PEFT would wrap it)."""
    from peft import get_peft_model

    wrapper = nn.Module()
    wrapper.proj = nn.Linear(base.in_features, base.out_features, device="meta")
    wrapper.proj.weight, wrapper.proj.bias = base.weight, base.bias
    return get_peft_model(wrapper, config).base_model.model.proj


def _fused(layer):
    from .peft_integration import fuse_peft

    fuse_peft(layer)
    return layer


def _peft_lora(base: nn.Linear, ours: LoRALinear, dropout: float = 0.0, fused: bool = False) -> Case:
    name = f"PEFT LoRA r={ours.rank}" + (f" dropout {dropout:g}" if dropout else "") + (" fused" if fused else "")
    try:
        from peft import LoraConfig
    except ImportError:
        return Case(name, None, note="peft not installed")
    layer = _peft_layer(base, LoraConfig(r=ours.rank, lora_alpha=ours.alpha, lora_dropout=dropout,
                                         target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.A)
        layer.lora_B["default"].weight.copy_(ours.B)
    return Case(name, _fused(layer) if fused else layer, ours_reference(ours), _trainable(layer), dropout=dropout)


def _peft_lokr(base: nn.Linear, ours: LoKrLinear, fused: bool = False) -> Case:
    name = f"PEFT LoKr r={ours.rank}" + (" fused" if fused else "")
    try:
        from peft import LoKrConfig
    except ImportError:
        return Case(name, None, note="peft not installed")
    layer = _peft_layer(base, LoKrConfig(r=ours.rank, alpha=ours.alpha, target_modules=["proj"]))
    ours_tensors = ours.factor_tensors()
    with torch.no_grad():
        for theirs, key in (("lokr_w1", "kernel"), ("lokr_w2_a", "B"), ("lokr_w2_b", "A"), ("lokr_w2", "B")):
            if "default" in getattr(layer, theirs):
                getattr(layer, theirs)["default"].copy_(ours_tensors[key])
    return Case(name, _fused(layer) if fused else layer, ours_reference(ours), _trainable(layer))


class _PlainTritonLinear(torch.autograd.Function):
    """``x·Wᵀ + b`` and ``dy·W`` through the fused GEMM kernel with its delta switched off: the
    Triton GEMM's own speed, so the fused rows' cost of the delta can be read apart from it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        from .ops.triton_backend import plain_gemm

        ctx.save_for_backward(weight)
        return plain_gemm(x, weight.T, bias)

    @staticmethod
    def backward(ctx, grad_y):
        from .ops.triton_backend import plain_gemm

        (weight,) = ctx.saved_tensors
        return plain_gemm(grad_y.contiguous(), weight, None), None, None


def ours_reference(m: AdaptedLinear):
    """x -> y of ``m`` computed densely by reference.py."""
    A, B, core, kernel = m._factors()
    return lambda x: reference.kron_delta_linear(x, m.weight, m.bias, A, B, core, kernel, m.scaling, order=m.order)


DROPOUT = 0.1  # the setting fine-tuning uses; its rows time the seeded mask regeneration


def build_cases(in_features, out_features, *, kernel_size, rank, lora_rank, dtype, device, seed=0):
    """All rows for one weight shape, sharing one frozen base layer."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) * in_features**-0.5)
        base.bias.copy_(torch.randn(base.bias.shape, generator=g) * 0.1)

    cases = [Case("nn.Linear (frozen)", base, lambda x: F.linear(x, base.weight, base.bias))]
    auto = resolve_backend("auto", device.type)  # what the layers use by default here
    backends = ["torch", "cpp"] + (["triton"] if device.type == "cuda" else [])  # no interpreter timings
    dcft = None
    for backend in backends:
        name = f"DCFTLinear d={kernel_size} r={rank} [{backend}]"
        if not is_available(backend):
            cases.append(Case(name, None, note=f"{backend} backend unavailable"))
            continue
        dcft = _randomize(DCFTLinear.from_linear(base, kernel_size=kernel_size, rank=rank, backend=backend),
                          torch.Generator().manual_seed(seed + 1))
        cases.append(Case(name, dcft, ours_reference(dcft), _trainable(dcft)))
        if backend == "triton":  # the other way to meet the GEMM: one kernel seeded with the delta
            cases.append(Case(f"DCFTLinear d={kernel_size} r={rank} [triton, fused GEMM]", dcft,
                              ours_reference(dcft), _trainable(dcft), setting=_fused_triton_gemm))
            cases.append(Case("Triton GEMM alone (fused kernel, no delta)",
                              lambda x: _PlainTritonLinear.apply(x, base.weight, base.bias),
                              lambda x: F.linear(x, base.weight, base.bias)))
    dropped = _randomize(DCFTLinear.from_linear(base, kernel_size=kernel_size, rank=rank, dropout=DROPOUT),
                         torch.Generator().manual_seed(seed + 1))
    cases.append(Case(f"DCFTLinear d={kernel_size} r={rank} dropout {DROPOUT:g} [{auto}]", dropped,
                      ours_reference(dropped), _trainable(dropped), dropout=DROPOUT))
    for cls, label in ((NaiveDCFT, "DCFT naive (authors' code)"), (MergedDenseDCFT, "DCFT dense F.linear(x, W+ΔW)")):
        layer = cls(dcft)
        cases.append(Case(label, layer, ours_reference(dcft), _trainable(layer)))

    for p in (0.0, DROPOUT):
        lora = _randomize(LoRALinear.from_linear(base, rank=lora_rank, alpha=2 * lora_rank, dropout=p),
                          torch.Generator().manual_seed(seed + 2))
        label = f"LoRALinear r={lora_rank}" + (f" dropout {p:g}" if p else "") + f" [{auto}]"
        cases.append(Case(label, lora, ours_reference(lora), _trainable(lora), dropout=p))
        cases.append(_peft_lora(base, lora, p))
        cases.append(_peft_lora(base, lora, p, fused=True))
    delora = _randomize(DeLoRALinear.from_linear(base, rank=lora_rank, alpha=2 * lora_rank),
                        torch.Generator().manual_seed(seed + 3))
    cases.append(Case(f"DeLoRALinear r={lora_rank} [{auto}]", delora, ours_reference(delora), _trainable(delora)))
    lokr = _randomize(LoKrLinear.from_linear(base, rank=lora_rank, alpha=lora_rank),
                      torch.Generator().manual_seed(seed + 4))
    cases.append(Case(f"LoKrLinear r={lora_rank} [{auto}]", lokr, ours_reference(lokr), _trainable(lokr)))
    cases.append(_peft_lokr(base, lokr))
    cases.append(_peft_lokr(base, lokr, fused=True))
    return cases


# ---- measuring -------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_timer(fn, device, inner=1):
    """A function that runs ``fn`` ``inner`` times and returns ms per call: CUDA events around one
    call after flushing L2 (as ``triton.testing.do_bench`` does), or wall time on the CPU."""
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # larger than any L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed():
            flush.zero_()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return timed

    def timed():
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner
    return timed


def saved_extra_bytes(case: Case, x):
    """Bytes the layer saves for backward beyond ``x`` itself and its own weights."""
    known = {x.data_ptr()}
    layer = case.layer
    if isinstance(layer, nn.Module):
        known |= {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    seen = {}

    def pack(t):
        if t.data_ptr() not in known:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def check(case: Case, x, grad_y, dtype):
    """Refuse to time a wrong layer: y and dx must match the dense reference (dropout rows in eval
    mode, where their dropout is off; the same masks on every backend are the tests' business)."""
    def outputs(fn, inp):
        inp = inp.detach().requires_grad_()
        y = fn(inp)
        (dx,) = torch.autograd.grad(y, [inp], grad_y.to(y.dtype))
        return y.double(), dx.double()

    layer = case.layer
    if case.dropout:
        layer.eval()
    try:
        y, dx = outputs(layer, x)
    finally:
        if case.dropout:
            layer.train()
    ry, rdx = outputs(case.reference, x)
    for got, want in ((y, ry), (dx, rdx)):
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        if not err <= CHECK_TOLERANCE[dtype]:
            return f"MISMATCH (rel. err {err:.2g})"
    return "ok"


def _step_functions(case, x, grad_y):
    inputs = [x] + case.params

    def fwd():
        with case.setting(), torch.no_grad():
            case.layer(x)

    def fwd_bwd():
        with case.setting():
            torch.autograd.grad(case.layer(x), inputs, grad_y)

    return fwd, fwd_bwd


def run_shape(tokens, in_features, out_features, *, device, dtype, kernel_size, rank, lora_rank,
              time_cap_s=45.0, min_rounds=7, max_rounds=200, target_width=0.02, progress=None, only=None):
    """Check every row, then time all of them in rounds; returns one Row per case. With ``only`` (a
    list of substrings), just the rows whose names hold one of them (any case), and the baseline."""
    shape = f"N={tokens} {in_features}->{out_features}"
    g = torch.Generator().manual_seed(123)
    x = torch.randn(tokens, in_features, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad_y = torch.randn(tokens, out_features, generator=g).to(device=device, dtype=dtype)
    cases = build_cases(in_features, out_features, kernel_size=kernel_size, rank=rank, lora_rank=lora_rank,
                        dtype=dtype, device=device)
    if only:
        cases = cases[:1] + [c for c in cases[1:] if any(s.lower() in c.name.lower() for s in only)]
    rows, timed = [], []
    for case in cases:
        if case.layer is None:
            rows.append(Row(shape, case.name, case.note))
            continue
        with case.setting():
            status = check(case, x, grad_y, dtype)
        rows.append(Row(shape, case.name, status, trainable_params=sum(p.numel() for p in case.params)))
        if status == "ok":
            timed.append((case, rows[-1]))
    baseline = timed[0][0].name
    steps = {case.name: _step_functions(case, x, grad_y) for case, _ in timed}
    for fwd, fwd_bwd in steps.values():  # warm-up: caches, autotuning, lazy init
        for _ in range(2):
            fwd()
            fwd_bwd()
    _sync(device)
    # Repeat tiny calls inside one sample so that a sample is ~10 ms on the CPU (timer resolution).
    probe = make_timer(steps[baseline][1], device)
    inner = 1 if device.type == "cuda" else max(1, math.ceil(10.0 / max(min(probe() for _ in range(3)), 1e-3)))
    timers = {}
    for name, (fwd, fwd_bwd) in steps.items():
        timers[("fwd", name)] = make_timer(fwd, device, inner)
        timers[("fwd+bwd", name)] = make_timer(fwd_bwd, device, inner)
    pairs = {key: ("fwd+bwd" if key[0] == "fwd+bwd" else "fwd", baseline) for key in timers}
    if progress is not None:
        progress.set_postfix_str(shape)
    result = run_rounds(timers, pairs, min_rounds=min_rounds, max_rounds=max_rounds, time_cap_s=time_cap_s,
                        target_width=target_width,
                        on_round=(lambda _: progress.update()) if progress is not None else None)
    for case, row in timed:
        fb, fw = result.samples[("fwd+bwd", case.name)], result.samples[("fwd", case.name)]
        row.fwd_ms, row.fwd_bwd_ms, row.rounds = statistics.median(fw), statistics.median(fb), result.rounds
        q = statistics.quantiles(fb, n=5) if len(fb) >= 2 else [fb[0]] * 4
        row.fwd_bwd_ms_q20, row.fwd_bwd_ms_q80 = q[0], q[3]
        row.tokens_per_s = tokens / (row.fwd_bwd_ms / 1e3)
        if case.name != baseline:
            total = paired_ratios(fb, result.samples[("fwd+bwd", baseline)])
            forward = paired_ratios(fw, result.samples[("fwd", baseline)])
            row.ratio, row.ratio_lo, row.ratio_hi, row.verdict = total.ratio, total.lo, total.hi, total.verdict
            row.fwd_ratio, row.fwd_ratio_lo, row.fwd_ratio_hi = forward.ratio, forward.lo, forward.hi
        else:
            row.ratio = row.ratio_lo = row.ratio_hi = row.fwd_ratio = row.fwd_ratio_lo = row.fwd_ratio_hi = 1.0
            row.verdict = "baseline"
        with case.setting():
            row.extra_saved_mb = saved_extra_bytes(case, x) / 2**20
            if device.type == "cuda":
                row.peak_extra_mb = _peak_extra_mb(case, x, grad_y, steps[case.name][1], device)
    return rows, result


def _peak_extra_mb(case, x, grad_y, fwd_bwd, device):
    """The allocator's peak during one fwd+bwd beyond y, dx and the parameter gradients."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fwd_bwd()
    _sync(device)
    unavoidable = (grad_y.numel() + x.numel()) * x.element_size() + sum(
        p.numel() * p.element_size() for p in case.params)
    return (torch.cuda.max_memory_allocated(device) - before - unavoidable) / 2**20


# ---- reporting --------------------------------------------------------------------------------

def environment(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
    }


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _interval(ratio, lo, hi, verdict=None):
    if ratio is None:
        return "-"
    text = f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{text} within noise" if verdict == "within noise" else text


def format_table(rows):
    from tabulate import tabulate

    table = [[r.shape, r.case, _fmt(r.fwd_ms, ".2f"), _fmt(r.fwd_bwd_ms, ".2f"),
              _interval(r.ratio, r.ratio_lo, r.ratio_hi, r.verdict), _interval(r.fwd_ratio, r.fwd_ratio_lo,
                                                                               r.fwd_ratio_hi),
              _fmt(r.extra_saved_mb, ".2f"), _fmt(r.peak_extra_mb, ".1f"), _fmt(r.trainable_params, ",d"), r.status]
             for r in rows]
    headers = ["shape", "layer", "fwd ms", "fwd+bwd ms", "fwd+bwd × Linear [95%]", "fwd × Linear [95%]",
               "saved MB", "peak MB", "trainable", "check"]
    return tabulate(table, headers=headers, tablefmt="github")


def write_results(out_dir, rows, meta):
    """results.json and results.csv, and ratios.png when matplotlib is installed."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    written = ["results.json", "results.csv"]
    try:
        plot_ratios(rows, meta, os.path.join(out_dir, "ratios.png"))
        written.append("ratios.png")
    except ImportError:
        print("no ratios.png: matplotlib is not installed (pip install matplotlib, or the [bench] extra)")
    return written


def plot_ratios(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        timed = [r for r in rows if r.shape == shape and r.ratio is not None][::-1]
        ratios = [r.ratio for r in timed]
        errors = [[r.ratio - r.ratio_lo for r in timed], [r.ratio_hi - r.ratio for r in timed]]
        ax.barh([r.case for r in timed], ratios, xerr=errors, color="tab:blue", capsize=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("fwd+bwd time / frozen nn.Linear (median paired ratio, 95% interval)")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{meta['device']} | {meta['dtype']} | torch {meta['torch']} | load {meta['load_before']:.2f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def physical_cores() -> int:
    """Cores this process may run on, counting hyper-threads once (Linux topology; else os.cpu_count)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    siblings = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings.add(f.read().strip())
        except OSError:
            return len(cpus)
    return max(1, len(siblings))


def params_table(kernel_sizes=(2, 4, 6, 8, 12)):
    """Trainable adapter parameters for the paper's models, DCFT vs LoRA r=1/8."""
    from tabulate import tabulate

    table = []
    for model, shapes in MODEL_SHAPES.items():
        for d in kernel_sizes:
            paper = PAPER_DEBERTA_V3_BASE.get(d) if model == "deberta-v3-base" else None
            table.append([model, f"DCFT d={d} r=1", count_adapter_parameters(shapes, "dcft", d, 1),
                          "-" if paper is None else f"{paper:,.0f}"])
        for r in (1, 8):
            table.append([model, f"LoRA r={r}", count_adapter_parameters(shapes, "lora", rank=r), "-"])
    return tabulate(table, headers=["model", "adapter", "trainable (ours)", "DCFT paper"],
                    tablefmt="github", intfmt=",")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dcft-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="cpu-small on CPU (default), llama7b on GPU")
    p.add_argument("--tokens", type=int)
    p.add_argument("--in", dest="in_features", type=int)
    p.add_argument("--out", dest="out_features", type=int)
    p.add_argument("--kernel-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=1, help="DCFT rank (default 1)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA/DeLoRA rank (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="float32 on CPU, bfloat16 on GPU by default")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores)")
    p.add_argument("--time-cap", type=float, default=45.0, help="seconds of rounds per shape at most (default 45)")
    p.add_argument("--min-rounds", type=int, default=7, help="rounds per shape at least (default 7)")
    p.add_argument("--target-width", type=float, default=0.02,
                   help="stop adding rounds once every 95%% interval is this narrow, relative (default 0.02)")
    p.add_argument("--rows", nargs="+", metavar="TEXT",
                   help="time only the rows whose names contain one of these (any case), with the baseline")
    p.add_argument("--out-dir", "-o", help="write results.json, results.csv and ratios.png here")
    p.add_argument("--params", action="store_true", help="print the parameter-count report and exit")
    args = p.parse_args(argv)
    if args.min_rounds < 3:
        p.error("--min-rounds must be at least 3")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.params:
        print(params_table())
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    preset = args.preset or ("llama7b" if device.type == "cuda" else "cpu-small")
    shapes = PRESETS[preset]
    if args.tokens or args.in_features or args.out_features:
        t0, i0, o0 = shapes[0]
        shapes = [(args.tokens or t0, args.in_features or i0, args.out_features or o0)]
        preset = "custom"
    cores = physical_cores()
    threads = args.threads or cores
    torch.set_num_threads(threads)

    from tqdm import tqdm

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = {**environment(device), "dtype": str(dtype).replace("torch.", ""), "preset": preset,
            "shapes": [list(s) for s in shapes], "threads": threads, "physical_cores": cores, "load_before": load,
            "kernel_size": args.kernel_size, "rank": args.rank, "lora_rank": args.lora_rank,
            "time_cap_s": args.time_cap, "min_rounds": args.min_rounds, "target_width": args.target_width,
            "rows": args.rows,
            "command": "dcft-bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']} | preset {preset} "
          f"| {threads} threads | load {load:.2f} | paired rounds, median ratio [95% interval]", flush=True)
    if load > cores:
        warnings.warn(f"the machine's load ({load:.2f}) exceeds its {cores} cores: figures are unreliable",
                      stacklevel=1)
    rows, rounds = [], []
    with tqdm(file=sys.stderr, leave=False, unit="round") as progress:
        for tokens, in_f, out_f in shapes:
            shape_rows, result = run_shape(tokens, in_f, out_f, device=device, dtype=dtype,
                                           kernel_size=args.kernel_size, rank=args.rank, lora_rank=args.lora_rank,
                                           time_cap_s=args.time_cap, min_rounds=args.min_rounds,
                                           target_width=args.target_width, progress=progress, only=args.rows)
            rows += shape_rows
            rounds.append(result.rounds)
    meta["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta["rounds"] = rounds
    print(format_table(rows))
    print(f"# rounds per shape: {rounds}; load before {load:.2f}, after {meta['load_after']:.2f}")
    if args.out_dir:
        written = write_results(args.out_dir, rows, meta)
        print(f"wrote {', '.join(os.path.join(args.out_dir, w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
