"""What only a GPU would show, checked without one: autotuning on live data, partial sums over
several splits and programs, launches per layer call, 64-bit offsets, and a compile for sm_80/90/100.

The numerics run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU); the
compile checks run in a subprocess without it, since ahead-of-time compilation needs the real JIT.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FUSED_BACKENDS
from dcft_kernels import structured_delta_linear
from helpers import check_against_reference, make_problem

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tk():
    from dcft_kernels.ops import triton_kernels

    return triton_kernels


def _run(pb, **kw):
    return structured_delta_linear(*pb.args(), scaling=pb.scaling, backend="triton", **kw)


# The autotuned kernels and two configs each (the key names of their tile sizes).
def _two_configs(name):
    import triton

    sizes = {"shrink_kernel": [dict(BLOCK_N=32, BLOCK_K=64), dict(BLOCK_N=16, BLOCK_K=32)],
             "expand_kernel": [dict(BLOCK_N=32, BLOCK_M=64), dict(BLOCK_N=16, BLOCK_M=32)],
             "factor_grad_kernel": [dict(BLOCK_N=32, BLOCK_B=16), dict(BLOCK_N=16, BLOCK_B=32)],
             "gemm_with_delta_kernel": [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
                                        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)]}[name]
    return [triton.Config(s, num_warps=4, num_stages=1) for s in sizes]


@pytest.mark.parametrize("gemm_path", ["cublas", "fused"])
def test_autotuning_on_live_data_leaves_outputs_exact(monkeypatch, gemm_path):
    """A GPU autotuner runs every config several times on the real arguments before it picks one:
    a kernel that adds into its output must not accumulate those runs (first call == reference)."""
    from dcft_kernels.ops import triton_backend as tb

    tk = _tk()
    runs = []

    def bench_three_times(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        runs.append(1)
        return [float(len(runs))] * 3

    for name in ("shrink_kernel", "expand_kernel", "factor_grad_kernel", "gemm_with_delta_kernel"):
        kernel = getattr(tk, name)
        monkeypatch.setattr(kernel, "configs", _two_configs(name))
        monkeypatch.setitem(kernel.__dict__, "do_bench", bench_three_times)  # shadows a cached_property
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "early_config_prune", None)  # the GPU pruning would keep one of these
    monkeypatch.setattr(tb, "GEMM_PATH", gemm_path)
    pb = make_problem((40,), 70, 50, 4, 3, core=True, device=DEVICE)
    check_against_reference(pb, lambda q: _run(q, dropout=0.2, seed=4), torch.float32, p=0.2, seed=4)
    assert len(runs) >= 3 * 2 * 2, "the autotuner did not benchmark two configs of each kernel, twice"


@pytest.mark.parametrize("core,kernel", [(True, True), (False, True), (True, False)])
def test_partial_sums_over_many_splits_and_programs(monkeypatch, core, kernel):
    """dA/dB summed from several token splits, dC/dK from more token blocks than programs."""
    from dcft_kernels.ops import triton_backend as tb

    monkeypatch.setattr(tb, "TOKENS_PER_SPLIT", 24)
    monkeypatch.setattr(tb, "GRAM_SLOTS", 2)
    pb = make_problem((3, 50), 37, 45, 3, 2, core=core, kernel=kernel, device=DEVICE)
    check_against_reference(pb, lambda q: _run(q, dropout=0.1, seed=8), torch.float32, p=0.1, seed=8)


def test_large_rank_times_kernel_goes_to_torch_backend():
    """r·d beyond one register tile is served by the torch backend, with the same results."""
    pb = make_problem((5,), 40, 48, 4, 40, device=DEVICE)  # r·d = 160 > MAX_RD
    check_against_reference(pb, _run, torch.float32)


# ---- launches per layer call ------------------------------------------------------------------------

_NOT_COMPUTE = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "reshape", "t",
                "transpose", "permute", "expand", "as_strided", "split", "split_with_sizes", "slice", "select",
                "detach", "alias", "unsqueeze", "squeeze", "lift_fresh", "_reshape_alias", "unbind", "numpy_T", "mT"}


class _Launches(TorchDispatchMode):
    """Records Triton launches and the ATen compute ops around them (not the ATen ops that Triton's
    CPU interpreter itself runs inside a launch), looking inside our custom ops."""

    def __init__(self):
        super().__init__()
        self.triton, self.aten, self.in_kernel = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_kernel and name not in _NOT_COMPUTE:
            self.aten.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """``launches(run)`` -> (Triton kernel names, ATen compute op names) of ``run()``."""
    from torch._library.triton import set_wrap_triton_enabled

    from dcft_kernels.ops import triton_backend as tb

    tk = _tk()
    current = []  # the recording mode, while one is active

    for name in ("shrink_kernel", "expand_kernel", "factor_grad_kernel", "sum_partials_kernel",
                 "gemm_with_delta_kernel"):
        kernel = getattr(tk, name)

        def counted(*args, _original=kernel.run, _name=name, **kwargs):
            mode = current[-1]
            mode.triton.append(_name)
            mode.in_kernel = True
            try:
                return _original(*args, **kwargs)
            finally:
                mode.in_kernel = False

        monkeypatch.setattr(kernel, "run", counted)

    def inside(mode, op, args, kwargs):
        with mode, set_wrap_triton_enabled(False):
            return op._init_fn(*args, **kwargs)

    for op in (tb.triton_forward, tb.triton_backward):
        op.register_torch_dispatch(_Launches, lambda mode, func, types, args, kwargs, _op=op:
                                   inside(mode, _op, args, kwargs))

    def record(run):
        mode = _Launches()
        current.append(mode)
        with mode:
            run()
        current.pop()
        return mode.triton, mode.aten

    return record


@pytest.mark.parametrize("adapter", ["dcft", "lora", "delora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_launches_per_layer_call(launches, adapter, dropout):
    """Forward ≤ 3 and backward ≤ 6 launches (Triton kernels + ATen compute ops), frozen base layer."""
    pb = make_problem((2, 24), 64, 48, 8 if adapter == "dcft" else 1, 8 if adapter != "dcft" else 1,
                      core=adapter == "delora", kernel=adapter == "dcft", device=DEVICE)
    pb.bias.requires_grad_(False)
    if adapter == "delora":  # A and B frozen, only the core trains
        pb.A.requires_grad_(False)
        pb.B.requires_grad_(False)
    box = {}

    def forward():
        box["y"] = _run(pb, dropout=dropout, seed=3)

    fwd_launches, fwd_ops = launches(forward)
    grad = torch.randn_like(box["y"])
    bwd_launches, bwd_ops = launches(lambda: box["y"].backward(grad))
    assert len(fwd_launches) + len(fwd_ops) <= 3, (fwd_launches, fwd_ops)
    assert len(bwd_launches) + len(bwd_ops) <= 6, (bwd_launches, bwd_ops)
    assert "shrink_kernel" in fwd_launches and "expand_kernel" in fwd_launches
    assert all(t.grad is not None for t in pb.tensors() if t.requires_grad)


# ---- ahead-of-time compilation for real GPUs ---------------------------------------------------------

def _aot(code: str) -> str:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET (AOT compilation needs the JIT)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_token_major_offsets_are_64_bit():
    """tokens × features passes 2³¹ at real sizes (195k tokens × 11008): the row offset into every
    token-major tensor must be 64-bit. Checked in the compiled TTIR (the int32 version has none)."""
    out = _aot("""
import json
from dcft_kernels.ops import triton_aot as ta
shapes = ["shrink bwd r·d=32 dC+dK", "shrink fwd r·d=32 core+kernel", "expand dx r·d=32 dropout",
          "factor_grad dB r·d=32 mix", "gemm dx r·d=32 dropout"]
irs = {}
for v in ta.variants(full=True, targets=(90,), dtypes=(ta.torch.bfloat16,)):
    if v.shape in shapes and v.shape not in irs:
        irs[v.shape] = ta.compile_variant(v, ir="ttir")
print(json.dumps(irs))
""")
    irs = json.loads(out.strip().splitlines()[-1])
    assert len(irs) == 5
    token_major = {"shrink fwd": {"v_ptr", "t_ptr", "u_ptr"}, "shrink bwd": {"v_ptr", "u_ptr", "saved_t_ptr"},
                   "expand dx": {"y_ptr", "u_ptr"}, "factor_grad dB": {"l_ptr", "r_ptr"},
                   "gemm dx": {"a_ptr", "b_ptr", "u_ptr", "out_ptr"}}
    for shape, ttir in irs.items():
        widths = _pointer_offsets_by_argument(ttir)
        checked = token_major[" ".join(shape.split()[:2])]
        assert checked <= set(widths), f"{shape}: found only {sorted(widths)} in the TTIR"
        for name in checked:  # the row part (token × stride) is the i64 one; columns may add i32
            assert "i64" in widths[name], f"{shape}: {name} is offset only in {widths[name]}"


def _pointer_offsets_by_argument(ttir: str) -> dict[str, set[str]]:
    """For each pointer argument of the kernel, the integer widths of the tensor offsets added to
    pointers derived from it (following splat / broadcast / addptr / expand_dims in the TTIR)."""
    header = re.search(r"tt\.func public @\w+\((.*?)\)\s*attributes", ttir, re.S).group(1)
    root = {f"%{name}": name for name in re.findall(r"%(\w+): !tt\.ptr", header)}
    widths: dict[str, set[str]] = {}
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w#]+) = tt\.(splat|broadcast|addptr|expand_dims) (%[\w#]+)", line)
        if not m or m.group(3) not in root:
            continue
        res, op, src = m.groups()
        root[res] = root[src]
        width = re.search(r",\s*tensor<[\dx]+x(i\d+)>", line) if op == "addptr" else None
        if width:
            widths.setdefault(root[src], set()).add(width.group(1))
    return widths


def test_every_kernel_compiles_for_sm80_sm90_sm100():
    """Quick matrix (each kernel's heaviest shape class, default and largest config, fp32/fp16/bf16,
    sm_80/90/100): compiles; shared memory within the architecture's limit whenever the autotuner's
    pruning keeps the config there, and never above the pruning's estimate; no register spills in
    a config the autotuner may pick. DCFT_KERNELS_AOT_FULL=1 runs every config of every shape class."""
    full = os.environ.get("DCFT_KERNELS_AOT_FULL") == "1"
    out = _aot(f"""
import json
from dcft_kernels.ops import triton_aot as ta, triton_kernels as tk
results = ta.compile_all(ta.variants(full={full}))
rows = []
for r in results:
    v = r.variant
    meta = ta._SHAPES[v.shape][1]({{"fp32": ta.torch.float32, "fp16": ta.torch.float16,
                                   "bf16": ta.torch.bfloat16}}[v.dtype])
    est = (tk.estimate_shared_memory(v.kernel, v.config_dict(), meta, 4 if v.dtype == "fp32" else 2)
           if v.kernel != "sum_partials" else None)
    rows.append(dict(name=f"{{v.shape}} {{v.config}} {{v.dtype}} sm_{{v.target}}", error=r.error, shared=r.shared,
                     spills=r.spill_bytes, picked=ta.may_be_picked(v), limit=tk.SHARED_MEMORY_LIMIT[v.target // 10],
                     estimate=est))
print(json.dumps(rows))
""")
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) >= 7 * 3 * 3
    problems = []
    for row in rows:
        if row["error"]:
            problems.append(f"{row['name']}: {row['error']}")
            continue
        if row["estimate"] is not None and row["shared"] > row["estimate"]:
            problems.append(f"{row['name']}: shared {row['shared']} B above the pruning estimate {row['estimate']}")
        if row["picked"] and row["shared"] > row["limit"]:
            problems.append(f"{row['name']}: shared {row['shared']} B > {row['limit']} B")
        if row["picked"] and row["spills"]:
            problems.append(f"{row['name']}: {row['spills']} B of register spills")
    assert not problems, "\n".join(problems)
