"""pytest-benchmark suites for the adapted layers (not part of the normal test run).

    pytest benchmarks/ --benchmark-only                # CPU: a small shape
    DCFT_BENCH_PRESET=llama7b pytest benchmarks/ --benchmark-only   # GPU sizes

Rows and inputs are the ones ``dcft-bench`` uses; each row is checked against
reference.py before it is timed. ``test_layer`` gives each row's own time; rows are compared only by
``test_paired_ratios``, which times them in interleaved rounds (the ratios land in ``extra_info``),
as ratios of rows timed in separate tests would be noise.
"""
import os

import pytest
import torch

from dcft_kernels.bench import PRESETS, build_cases, check, run_shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
PRESET = os.environ.get("DCFT_BENCH_PRESET", "llama7b" if DEVICE.type == "cuda" else "tiny")
SHAPES = PRESETS[PRESET]
CASE_NAMES = [c.name for c in build_cases(8, 8, kernel_size=8, rank=1, lora_rank=8, dtype=DTYPE, device=DEVICE)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"N{s[0]}-{s[1]}x{s[2]}")
def problem(request):
    tokens, in_f, out_f = request.param
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=g).to(DEVICE, DTYPE).requires_grad_()
    grad_y = torch.randn(tokens, out_f, generator=g).to(DEVICE, DTYPE)
    cases = {c.name: c for c in build_cases(in_f, out_f, kernel_size=8, rank=1, lora_rank=8, dtype=DTYPE,
                                            device=DEVICE)}
    return x, grad_y, cases


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_layer(benchmark, problem, name, mode):
    x, grad_y, cases = problem
    case = cases[name]
    if case.layer is None:
        pytest.skip(case.note)
    inputs = [x] + case.params

    def step():
        with case.setting():
            if mode == "fwd":
                with torch.no_grad():
                    case.layer(x)
            else:
                torch.autograd.grad(case.layer(x), inputs, grad_y)
        _sync()

    with case.setting():
        assert check(case, x, grad_y, DTYPE) == "ok"

    benchmark.group = f"{mode} {tuple(x.shape)}→{grad_y.shape[1]}"
    benchmark(step)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-{s[1]}x{s[2]}")
def test_paired_ratios(benchmark, shape):
    """Every row against the frozen nn.Linear of the same round: median ratio and 95% interval."""
    tokens, in_f, out_f = shape
    rows, _ = benchmark.pedantic(run_shape, args=(tokens, in_f, out_f), kwargs=dict(
        device=DEVICE, dtype=DTYPE, kernel_size=8, rank=1, lora_rank=8, time_cap_s=30.0), rounds=1, iterations=1)
    benchmark.group = f"paired ratios {shape}"
    benchmark.extra_info["ratios"] = {r.case: [r.ratio, r.ratio_lo, r.ratio_hi, r.verdict] for r in rows
                                      if r.ratio is not None}
    assert all(r.status == "ok" for r in rows if r.fwd_ms is not None)
