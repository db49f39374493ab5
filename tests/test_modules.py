"""DCFTLinear, LoRALinear, DeLoRALinear: construction, equality with reference.py, merge, init."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FUSED_BACKENDS
from dcft_kernels import DCFTLinear, DeLoRALinear, LoRALinear, reference

MODULES = {
    "dcft": lambda i, o, **kw: DCFTLinear(i, o, kernel_size=3, rank=2, alpha=4, **kw),
    "lora": lambda i, o, **kw: LoRALinear(i, o, rank=4, alpha=8, **kw),
    "delora": lambda i, o, **kw: DeLoRALinear(i, o, rank=3, alpha=6, **kw),
}


def _randomize(module):
    """Give every adapter factor non-zero values so ΔW ≠ 0."""
    with torch.no_grad():
        for t in (module.A, module.B, getattr(module, "core", None), getattr(module, "kernel", None)):
            if t is not None:
                t.normal_(0, 0.3)
    return module


def _reference_delta(module):
    o, i, s = module.out_features, module.in_features, module.scaling
    if isinstance(module, DCFTLinear):
        return reference.dcft_delta_weight(module.A, module.B, module.kernel, o, i, s)
    if isinstance(module, DeLoRALinear):
        return reference.delora_delta_weight(module.A, module.B, module.core, s)
    return reference.lora_delta_weight(module.A, module.B, s)


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_forward_and_grads_match_reference(kind, backend):
    torch.manual_seed(0)
    m = _randomize(MODULES[kind](19, 14, backend=backend))
    x = torch.randn(2, 5, 19, requires_grad=True)
    y = m(x)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    y_ref = F.linear(x, m.weight + _reference_delta(m), m.bias)
    ref_grads = torch.autograd.grad(y_ref.square().sum(), [x, *params])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", MODULES)
def test_step_zero_equals_frozen_layer(kind):
    m = MODULES[kind](24, 20)
    x = torch.randn(6, 24)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=0, atol=0)


def test_dcft_zero_init_still_trains_every_factor():
    m = DCFTLinear(32, 24, kernel_size=4, rank=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, target = torch.randn(16, 32), torch.randn(16, 24)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(m(x), target).backward()
        grads.append({n: p.grad.abs().sum().item() for n, p in m.named_parameters() if p.requires_grad})
        opt.step()
    assert grads[0]["B"] > 0  # B learns at once ...
    assert grads[1]["A"] > 0 and grads[1]["kernel"] > 0  # ... and A, kernel from the second step


def test_dcft_paper_init():
    torch.manual_seed(0)
    m = DCFTLinear(256, 256, init="paper")
    for p in (m.A, m.B, m.kernel):
        assert abs(p.std().item() - 0.02) < 0.01
    assert m.delta_weight().abs().sum() > 0
    with pytest.raises(ValueError, match="init must be"):
        DCFTLinear(8, 8, init="xavier")


@pytest.mark.parametrize("kind", MODULES)
def test_from_linear_shares_weight(kind):
    linear = nn.Linear(16, 12)
    cls = {"dcft": DCFTLinear, "lora": LoRALinear, "delora": DeLoRALinear}[kind]
    m = cls.from_linear(linear, rank=2)
    assert m.weight is linear.weight and m.bias is linear.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert (m.in_features, m.out_features) == (16, 12)
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), linear(x))


@pytest.mark.parametrize("kind", MODULES)
def test_merge_unmerge_round_trip(kind):
    torch.manual_seed(0)
    m = _randomize(MODULES[kind](21, 17))
    x = torch.randn(4, 21)
    before, weight0 = m(x), m.weight.clone()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m.weight, weight0 + _reference_delta(m).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert not m.merged
    torch.testing.assert_close(m.weight, weight0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="not merged"):
        m.unmerge()


@pytest.mark.parametrize("kind", MODULES)
def test_dropout_only_on_adapter_branch(kind):
    torch.manual_seed(0)
    m = MODULES[kind](16, 16, dropout=0.5)
    x = torch.randn(8, 16)
    # ΔW = 0 at step 0: dropout on the adapter branch must leave the frozen path untouched.
    torch.testing.assert_close(m.train()(x), F.linear(x, m.weight, m.bias))
    _randomize(m)
    m.train()
    assert not torch.allclose(m(x), m(x))  # fresh mask each call
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(m(x), F.linear(x, m.weight + _reference_delta(m), m.bias), rtol=1e-4, atol=1e-5)


def test_parameters_state_dict_and_counts():
    dcft = DCFTLinear(100, 50, kernel_size=8, rank=1)
    assert dcft.A.shape == (1, 13) and dcft.B.shape == (7, 1) and dcft.kernel.shape == (8, 8)
    assert dcft.trainable_parameters == 13 + 7 + 64
    assert set(dcft.state_dict()) == {"weight", "bias", "A", "B", "kernel"}
    lora = LoRALinear(100, 50, rank=8, alpha=16)
    assert lora.A.shape == (8, 100) and lora.B.shape == (50, 8) and lora.scaling == 2.0
    assert lora.trainable_parameters == 8 * 150
    delora = DeLoRALinear(100, 50, rank=4, alpha=8)
    assert delora.trainable_parameters == 16 and delora.scaling == 2.0
    assert set(delora.state_dict()) == {"weight", "bias", "A", "B", "core"}
    assert [n for n, p in delora.named_parameters() if p.requires_grad] == ["core"]
    assert DCFTLinear(8, 8, alpha=4, rank=2).scaling == 2.0 and DCFTLinear(8, 8).scaling == 1.0


def test_reset_parameters_resets_adapter_only():
    m = _randomize(LoRALinear(8, 6))
    w = m.weight.clone()
    m.reset_parameters()
    assert torch.equal(m.B, torch.zeros_like(m.B)) and torch.equal(m.weight, w)


def test_extra_repr():
    text = repr(DCFTLinear(32, 16, kernel_size=4, rank=2, dropout=0.1))
    for part in ("in_features=32", "out_features=16", "kernel_size=4", "rank=2", "dropout=0.1", "backend='auto'"):
        assert part in text


def test_dtype_and_device_follow_the_base_layer():
    m = DCFTLinear.from_linear(nn.Linear(16, 16, dtype=torch.float64), kernel_size=4)
    assert m.A.dtype == m.kernel.dtype == torch.float64
    m = DCFTLinear(16, 16).to(torch.bfloat16)
    assert m(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bad,match", [
    (dict(kernel_size=0), "kernel_size"), (dict(rank=0), "rank"), (dict(dropout=1.5), "dropout"),
    (dict(backend="fast"), "backend"), (dict(in_features=0), "in_features"), (dict(rank=1.5), "rank"),
])
def test_bad_constructor_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        DCFTLinear(**{"in_features": 8, "out_features": 8, **bad})


def test_bad_forward_input():
    m = DCFTLinear(16, 8)
    with pytest.raises(ValueError, match="in_features=16"):
        m(torch.randn(3, 15))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Linear"):
        DCFTLinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_autocast_runs_in_low_precision_with_fp32_parameters(kind, backend):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("bfloat16 is broken in Triton's CPU interpreter")
    torch.manual_seed(0)
    m = _randomize(MODULES[kind](32, 24, backend=backend))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    want = F.linear(x, m.weight + _reference_delta(m), m.bias)
    torch.testing.assert_close(y.float(), want.detach(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cls", [DCFTLinear, LoRALinear, DeLoRALinear])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 3)])
def test_output_is_not_a_view(backend, cls, lead):
    """Like nn.Linear: FSDP2 warns on view outputs, and an in-place add into one would skip its hooks."""
    kwargs = {"kernel_size": 4} if cls is DCFTLinear else {}
    layer = cls(16, 8, backend=backend, **kwargs)
    y = layer(torch.randn(*lead, 16, requires_grad=True))
    assert not y._is_view() and y.shape == (*lead, 8)
    (y * 2).sum().backward()
    assert layer.trainable_parameters and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
