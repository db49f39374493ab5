"""Regularisers against hand computations; parameter counts against the DCFT paper."""
import pytest
import torch
from torch import nn

from dcft_kernels import DCFTLinear, DeLoRALinear, LoRALinear, mpc_d_penalty, orthogonality_loss, orthogonality_penalty
from dcft_kernels.params import MODEL_SHAPES, PAPER_DEBERTA_V3_BASE, adapter_parameters, count_adapter_parameters


def test_orthogonality_penalty_by_hand():
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])  # A·Aᵀ = [[5, 2], [2, 2]]
    B = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # Bᵀ·B = [[1, 0], [0, 4]]
    # ‖[[4, 2], [2, 1]]‖² = 25, ‖[[0, 0], [0, 3]]‖² = 9
    assert orthogonality_penalty(A, B).item() == pytest.approx(34.0)
    assert orthogonality_penalty(A, B, squared=False).item() == pytest.approx(5.0 + 3.0)
    # MPC_d: Bᵀ·B − I as above (9); off-diagonal of A·Aᵀ is [[0, 2], [2, 0]] (8)
    assert mpc_d_penalty(A, B).item() == pytest.approx(17.0)


def test_orthogonal_factors_have_zero_penalty():
    q, _ = torch.linalg.qr(torch.randn(10, 3))
    assert orthogonality_penalty(q.T, q).item() == pytest.approx(0.0, abs=1e-5)


def test_orthogonality_loss_over_model():
    torch.manual_seed(0)
    model = nn.Sequential(DCFTLinear(16, 16, kernel_size=4), nn.ReLU(), LoRALinear(16, 8, rank=2), DeLoRALinear(8, 8))
    a, b = model[0], model[2]
    want = orthogonality_penalty(a.A, a.B) + orthogonality_penalty(b.A, b.B)
    torch.testing.assert_close(orthogonality_loss(model), want)
    torch.testing.assert_close(orthogonality_loss(model, reduction="mean"), want / 2)
    loss = orthogonality_loss(model, squared=False, kind="mpc_d")
    loss.backward()
    assert a.A.grad is not None and a.kernel.grad is None  # the kernel is not regularised
    with pytest.raises(ValueError, match="no adapter"):
        orthogonality_loss(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="kind"):
        orthogonality_loss(model, kind="l2")


def test_parameter_counts_match_modules():
    for d in (1, 3, 8):
        m = DCFTLinear(50, 70, kernel_size=d, rank=2)
        assert m.trainable_parameters == adapter_parameters(70, 50, "dcft", d, 2)
    assert LoRALinear(50, 70, rank=8).trainable_parameters == adapter_parameters(70, 50, "lora", rank=8)
    assert DeLoRALinear(50, 70, rank=8).trainable_parameters == adapter_parameters(70, 50, "delora", rank=8)


@pytest.mark.parametrize("d", sorted(PAPER_DEBERTA_V3_BASE))
def test_deberta_counts_reproduce_paper_order_of_magnitude(d):
    ours = count_adapter_parameters(MODEL_SHAPES["deberta-v3-base"], "dcft", kernel_size=d, rank=1)
    paper = PAPER_DEBERTA_V3_BASE[d]
    assert 1.0 <= ours / paper <= 1.06, (ours, paper)  # see params.py for the 3-5% gap
    lora_r1 = count_adapter_parameters(MODEL_SHAPES["deberta-v3-base"], "lora", rank=1)
    if d == 8:
        assert 6 < lora_r1 / ours < 8  # "8× fewer than rank-1 LoRA", less the 64-parameter kernels


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        adapter_parameters(4, 4, "ia3")
