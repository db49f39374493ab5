"""The main job: a side-by-side benchmark of adapted linear layers.

Every row gets the same frozen weight, the same input and the same output
gradient; each row's forward output and input gradient is first checked against
``reference.py`` and a row that does not match is reported, never timed.

    dcft-bench                       # cpu-small on CPU, llama7b on GPU
    dcft-bench --preset llama7b --out benchmarks/results/h100
    dcft-bench --params              # trainable-parameter report
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .autograd import is_available, resolve_backend
from .modules import AdaptedLinear, DCFTLinear, DeLoRALinear, LoRALinear
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


@dataclass
class Row:
    shape: str
    case: str
    status: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    ratio_to_linear: float | None = None
    tokens_per_s: float | None = None
    extra_saved_mb: float | None = None
    peak_extra_mb: float | None = None
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
        for name in ("A", "B", "core", "kernel"):
            t = getattr(module, name, None)
            if t is not None:
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


def _peft_lora(base: nn.Linear, ours: LoRALinear) -> Case:
    name = f"PEFT LoRA r={ours.rank}"
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return Case(name, None, note="peft not installed")
    wrapper = nn.Module()
    wrapper.proj = nn.Linear(base.in_features, base.out_features, device="meta")
    wrapper.proj.weight, wrapper.proj.bias = base.weight, base.bias  # share, as PEFT would wrap it
    model = get_peft_model(wrapper, LoraConfig(r=ours.rank, lora_alpha=ours.alpha, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.A)
        layer.lora_B["default"].weight.copy_(ours.B)
    ref = ours_reference(ours)
    return Case(name, layer, ref, _trainable(layer))


def ours_reference(m: AdaptedLinear):
    """x -> y of ``m`` computed densely by reference.py."""
    A, B, core, kernel = m._factors()
    return lambda x: reference.structured_delta_linear(
        x, m.weight, m.bias, A, B, core, kernel, m.scaling)


def build_cases(in_features, out_features, *, kernel_size, rank, lora_rank, dtype, device, seed=0):
    """All rows for one weight shape, sharing one frozen base layer."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) * in_features**-0.5)
        base.bias.copy_(torch.randn(base.bias.shape, generator=g) * 0.1)

    cases = [Case("nn.Linear (frozen)", base, lambda x: F.linear(x, base.weight, base.bias))]
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
    for cls, label in ((NaiveDCFT, "DCFT naive (authors' code)"), (MergedDenseDCFT, "DCFT dense F.linear(x, W+ΔW)")):
        layer = cls(dcft)
        cases.append(Case(label, layer, ours_reference(dcft), _trainable(layer)))

    auto = resolve_backend("auto", device.type)  # what LoRA/DeLoRA layers use by default here
    lora = _randomize(LoRALinear.from_linear(base, rank=lora_rank, alpha=2 * lora_rank),
                      torch.Generator().manual_seed(seed + 2))
    cases.append(Case(f"LoRALinear r={lora_rank} [{auto}]", lora, ours_reference(lora), _trainable(lora)))
    cases.append(_peft_lora(base, lora))
    delora = _randomize(DeLoRALinear.from_linear(base, rank=lora_rank, alpha=2 * lora_rank),
                        torch.Generator().manual_seed(seed + 3))
    cases.append(Case(f"DeLoRALinear r={lora_rank} [{auto}]", delora, ours_reference(delora), _trainable(delora)))
    return cases


# ---- measuring -------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup, repeats):
    """Median wall time of ``fn`` in ms over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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
    """Refuse to time a wrong layer: y and dx must match the dense reference."""
    def outputs(fn, inp):
        inp = inp.detach().requires_grad_()
        y = fn(inp)
        (dx,) = torch.autograd.grad(y, [inp], grad_y.to(y.dtype))
        return y.double(), dx.double()

    y, dx = outputs(case.layer, x)
    ry, rdx = outputs(case.reference, x)
    for got, want in ((y, ry), (dx, rdx)):
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        if not err <= CHECK_TOLERANCE[dtype]:
            return f"MISMATCH (rel. err {err:.2g})"
    return "ok"


def run_shape(tokens, in_features, out_features, *, device, dtype, kernel_size, rank, lora_rank,
              warmup, repeats, progress=None):
    shape = f"N={tokens} {in_features}->{out_features}"
    g = torch.Generator().manual_seed(123)
    x = torch.randn(tokens, in_features, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad_y = torch.randn(tokens, out_features, generator=g).to(device=device, dtype=dtype)
    cases = build_cases(in_features, out_features, kernel_size=kernel_size, rank=rank, lora_rank=lora_rank,
                        dtype=dtype, device=device)
    rows, linear_ms = [], None
    for case in cases:
        if progress is not None:
            progress.set_postfix_str(f"{shape} {case.name}")
        if case.layer is None:
            rows.append(Row(shape, case.name, case.note))
        else:
            rows.append(measure(case, shape, x, grad_y, device, dtype, warmup, repeats))
            if case.name.startswith("nn.Linear"):
                linear_ms = rows[-1].fwd_bwd_ms
            if linear_ms and rows[-1].fwd_bwd_ms:
                rows[-1].ratio_to_linear = rows[-1].fwd_bwd_ms / linear_ms
        if progress is not None:
            progress.update()
    return rows


def measure(case, shape, x, grad_y, device, dtype, warmup, repeats):
    with case.setting():
        return _measure(case, shape, x, grad_y, device, dtype, warmup, repeats)


def _measure(case, shape, x, grad_y, device, dtype, warmup, repeats):
    status = check(case, x, grad_y, dtype)
    row = Row(shape, case.name, status, trainable_params=sum(p.numel() for p in case.params))
    if status != "ok":
        return row
    inputs = [x] + case.params

    def fwd():
        with torch.no_grad():
            case.layer(x)

    def fwd_bwd():
        torch.autograd.grad(case.layer(x), inputs, grad_y)

    row.fwd_ms = time_ms(fwd, device, warmup, repeats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    row.fwd_bwd_ms = time_ms(fwd_bwd, device, warmup, repeats)
    if device.type == "cuda":
        # Beyond y, dx and the parameter gradients that every row must produce anyway.
        unavoidable = (grad_y.numel() + x.numel()) * x.element_size() + sum(
            p.numel() * p.element_size() for p in case.params)
        row.peak_extra_mb = (torch.cuda.max_memory_allocated(device) - before - unavoidable) / 2**20
    row.extra_saved_mb = saved_extra_bytes(case, x) / 2**20
    row.tokens_per_s = x.shape[0] / (row.fwd_bwd_ms / 1e3)
    return row


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


def format_table(rows):
    from tabulate import tabulate

    table = [[r.shape, r.case, _fmt(r.fwd_ms, ".2f"), _fmt(r.fwd_bwd_ms, ".2f"), _fmt(r.ratio_to_linear, ".2f"),
              _fmt(r.tokens_per_s, ",.0f"), _fmt(r.extra_saved_mb, ".2f"), _fmt(r.peak_extra_mb, ".1f"),
              _fmt(r.trainable_params, ",d"), r.status] for r in rows]
    headers = ["shape", "layer", "fwd ms", "fwd+bwd ms", "× Linear", "tokens/s", "saved MB", "peak MB",
               "trainable", "check"]
    return tabulate(table, headers=headers, tablefmt="github")


def write_results(out_dir, rows, meta):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot_ratios(rows, meta, os.path.join(out_dir, "ratios.png"))


def plot_ratios(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        timed = [r for r in rows if r.shape == shape and r.ratio_to_linear is not None]
        ax.barh([r.case for r in timed][::-1], [r.ratio_to_linear for r in timed][::-1], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("fwd+bwd time / frozen nn.Linear")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{meta['device']} | {meta['dtype']} | torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (>= 5)")
    p.add_argument("--out-dir", "-o", help="write results.json, results.csv and ratios.png here")
    p.add_argument("--params", action="store_true", help="print the parameter-count report and exit")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.params:
        print(params_table())
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    shapes = PRESETS[args.preset or ("llama7b" if device.type == "cuda" else "cpu-small")]
    if args.tokens or args.in_features or args.out_features:
        t0, i0, o0 = shapes[0]
        shapes = [(args.tokens or t0, args.in_features or i0, args.out_features or o0)]

    from tqdm import tqdm

    meta = {**environment(device), "dtype": str(dtype).replace("torch.", ""), "kernel_size": args.kernel_size,
            "rank": args.rank, "lora_rank": args.lora_rank, "repeats": args.repeats, "warmup": args.warmup}
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']} | "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    rows = []
    n_cases = len(build_cases(8, 8, kernel_size=args.kernel_size, rank=args.rank, lora_rank=args.lora_rank,
                              dtype=dtype, device=device))
    with tqdm(total=n_cases * len(shapes), file=sys.stderr, leave=False) as progress:
        for tokens, in_f, out_f in shapes:
            rows += run_shape(tokens, in_f, out_f, device=device, dtype=dtype, kernel_size=args.kernel_size,
                              rank=args.rank, lora_rank=args.lora_rank, warmup=args.warmup, repeats=args.repeats,
                              progress=progress)
    print(format_table(rows))
    if args.out_dir:
        write_results(args.out_dir, rows, meta)
        print(f"wrote {args.out_dir}/results.json, results.csv, ratios.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
