"""The benchmark entry point on a tiny preset: output schema, and refusal to time wrong layers."""
import csv
import json

import pytest
import torch

from dcft_kernels import bench


FAST = ["--preset", "tiny", "--time-cap", "0", "--min-rounds", "3"]


def test_tiny_run_writes_schema(tmp_path, capsys):
    assert bench.main(FAST + ["--out-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "nn.Linear (frozen)" in table and "DCFTLinear d=8 r=1 [torch]" in table
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("device", "torch", "triton", "date", "git_commit", "dtype", "preset", "shapes", "threads",
                "load_before", "load_after", "rounds"):
        assert key in data["meta"]
    assert data["meta"]["preset"] == "tiny" and data["meta"]["rounds"] == [3]
    rows = data["rows"]
    names = [r["case"] for r in rows]
    auto = bench.resolve_backend("auto", "cpu")
    for expected in ("nn.Linear (frozen)", "DCFT naive (authors' code)", "DCFT dense F.linear(x, W+ΔW)",
                     f"LoRALinear r=8 [{auto}]", "PEFT LoRA r=8", f"DeLoRALinear r=8 [{auto}]",
                     f"DCFTLinear d=8 r=1 dropout 0.1 [{auto}]", f"LoRALinear r=8 dropout 0.1 [{auto}]",
                     "PEFT LoRA r=8 dropout 0.1", "PEFT LoRA r=8 fused", "PEFT LoRA r=8 dropout 0.1 fused",
                     f"LoKrLinear r=8 [{auto}]", "PEFT LoKr r=8", "PEFT LoKr r=8 fused"):
        assert expected in names
    timed = [r for r in rows if r["fwd_bwd_ms"] is not None]
    assert timed and all(r["status"] == "ok" for r in timed)  # every timed row matched the reference
    for r in timed:  # the fixed names scripts read
        for key in ("ratio", "ratio_lo", "ratio_hi", "rounds", "fwd_ms", "fwd_bwd_ms", "fwd_ratio"):
            assert r[key] is not None, (r["case"], key)
        assert r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] and r["rounds"] == 3
    with open(tmp_path / "results.csv") as f:
        assert list(csv.DictReader(f))[0].keys() == rows[0].keys()
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_without_matplotlib_writes_json_and_csv_and_says_why(tmp_path, capsys, monkeypatch):
    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(bench, "plot_ratios", no_matplotlib)
    assert bench.main(FAST + ["-o", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.csv").exists()
    assert not (tmp_path / "ratios.png").exists()
    assert "no ratios.png: matplotlib is not installed" in capsys.readouterr().out


def test_wrong_layer_is_refused(monkeypatch):
    """A layer that disagrees with reference.py gets a MISMATCH row and no timing."""
    real = bench.build_cases

    def with_a_broken_row(*args, **kwargs):
        cases = real(*args, **kwargs)
        dcft = next(c for c in cases if c.name.startswith("DCFTLinear"))
        broken = bench.Case("broken", lambda t: dcft.layer(t) + 1e-2, dcft.reference, dcft.params)
        return cases + [broken]

    monkeypatch.setattr(bench, "build_cases", with_a_broken_row)
    rows, _ = bench.run_shape(4, 16, 8, device=torch.device("cpu"), dtype=torch.float32, kernel_size=4, rank=1,
                              lora_rank=2, time_cap_s=0, min_rounds=3)
    broken = next(r for r in rows if r.case == "broken")
    assert broken.status.startswith("MISMATCH") and broken.fwd_ms is None and broken.ratio is None
    assert all(r.status == "ok" for r in rows if r.case != "broken" and r.fwd_ms is not None)


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


def test_rows_option_times_only_the_named_rows_and_the_baseline(tmp_path):
    assert bench.main(FAST + ["--rows", "loralinear", "DeLoRA", "-o", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    names = [r["case"] for r in data["rows"]]
    assert names[0] == "nn.Linear (frozen)" and len(names) > 1
    assert all("LoRALinear" in n for n in names[1:]), names  # DeLoRALinear and LoRALinear rows only
    assert data["meta"]["rows"] == ["loralinear", "DeLoRA"]
