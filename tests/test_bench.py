"""The benchmark entry point on a tiny preset: output schema, and refusal to time wrong layers."""
import csv
import json

import pytest
import torch

from dcft_kernels import bench


def test_tiny_run_writes_schema(tmp_path, capsys):
    assert bench.main(["--preset", "tiny", "--out-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "nn.Linear (frozen)" in table and "DCFTLinear d=8 r=1 [torch]" in table
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("device", "torch", "triton", "date", "git_commit", "dtype"):
        assert key in data["meta"]
    rows = data["rows"]
    names = [r["case"] for r in rows]
    auto = bench.resolve_backend("auto", "cpu")
    for expected in ("nn.Linear (frozen)", "DCFT naive (authors' code)", "DCFT dense F.linear(x, W+ΔW)",
                     f"LoRALinear r=8 [{auto}]", "PEFT LoRA r=8", f"DeLoRALinear r=8 [{auto}]"):
        assert expected in names
    timed = [r for r in rows if r["fwd_bwd_ms"] is not None]
    assert timed and all(r["status"] == "ok" for r in timed)  # every timed row matched the reference
    linear = next(r for r in rows if r["case"] == "nn.Linear (frozen)")
    assert linear["ratio_to_linear"] == 1.0
    with open(tmp_path / "results.csv") as f:
        assert list(csv.DictReader(f))[0].keys() == rows[0].keys()
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_wrong_layer_is_refused():
    """A layer that disagrees with reference.py gets a MISMATCH row and no timing."""
    cases = bench.build_cases(16, 8, kernel_size=4, rank=1, lora_rank=2, dtype=torch.float32,
                              device=torch.device("cpu"))
    dcft = next(c for c in cases if c.name.startswith("DCFTLinear"))
    broken = bench.Case("broken", lambda t: dcft.layer(t) + 1e-2, dcft.reference, dcft.params)
    x = torch.randn(4, 16, requires_grad=True)
    row = bench.measure(broken, "s", x, torch.randn(4, 8), torch.device("cpu"), torch.float32, 1, 5)
    assert row.status.startswith("MISMATCH") and row.fwd_ms is None and row.fwd_bwd_ms is None
    assert bench.measure(dcft, "s", x, torch.randn(4, 8), torch.device("cpu"), torch.float32, 1, 5).status == "ok"


def test_params_report(capsys):
    assert bench.main(["--params"]) == 0
    out = capsys.readouterr().out
    assert "deberta-v3-base" in out and "DCFT d=8 r=1" in out and "24,000" in out


def test_fused_gemm_setting_is_scoped():
    pytest.importorskip("triton")
    from dcft_kernels.ops import triton_backend

    before = triton_backend.GEMM_PATH
    with bench._fused_triton_gemm():
        assert triton_backend.GEMM_PATH == "fused"
    assert triton_backend.GEMM_PATH == before
