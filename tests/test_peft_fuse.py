"""fuse_peft: PEFT's own LoRA layers computed through the fused op, PEFT working unchanged around them."""
import copy

import pytest
import torch
from helpers import TOLERANCE
from torch import nn

from dcft_kernels import fuse_peft, reference, unfuse_peft
from dcft_kernels.dropout import dropout_mask, new_seed

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


def _peft_model(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16)).to(dtype)
    model = get_peft_model(base, LoraConfig(target_modules=["0", "2"], **{"r": 4, "lora_alpha": 8, **lora}))
    _randomise_b(model)
    return model


def _randomise_b(model):
    # PEFT starts with B = 0, which would leave every gradient but B's at zero.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)


def _fused_pair(**lora):
    peft_model = _peft_model(**lora)
    fused = copy.deepcopy(peft_model)
    report = fuse_peft(fused)
    assert report.fused == ["base_model.model.0", "base_model.model.2"] and not report.left_to_peft
    return peft_model, fused


def _output_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, x.grad, grads


def _assert_same(got, want, dtype=torch.float32):
    (y, dx, grads), (y_want, dx_want, grads_want) = got, want
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_want, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_want, rtol=tol, atol=tol)
    assert grads.keys() == grads_want.keys() and len(grads) == 4
    for name in grads:
        torch.testing.assert_close(grads[name], grads_want[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def _computed_by_fused_op(y):
    return "StructuredDeltaLinear" in type(y.grad_fn).__name__


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"r": 1, "lora_alpha": 3}], ids=["lora", "rslora", "r1"])
def test_fused_equals_peft_outputs_and_gradients(lora):
    peft_model, fused = _fused_pair(**lora)
    x = torch.randn(3, 5, 24)
    got = _output_and_grads(fused, x)
    assert _computed_by_fused_op(got[0])
    _assert_same(got, _output_and_grads(peft_model, x))


def test_fused_dropout_is_lora_on_the_seeded_mask():
    _, fused = _fused_pair(lora_dropout=0.25)
    fused.train()
    x = torch.randn(6, 24)
    torch.manual_seed(5)
    y = fused(x)
    torch.manual_seed(5)
    layer0, layer2 = fused.base_model.model[0], fused.base_model.model[2]
    mask0 = dropout_mask(x.shape, 0.25, new_seed(), x.device, x.dtype)
    h = reference.structured_delta_linear(x, layer0.base_layer.weight, layer0.base_layer.bias,
                                          layer0.lora_A["default"].weight, layer0.lora_B["default"].weight, None, None,
                                          layer0.scaling["default"], mask0)
    h = torch.nn.functional.gelu(h)
    seed2 = new_seed()
    want = reference.structured_delta_linear(h, layer2.base_layer.weight, layer2.base_layer.bias,
                                             layer2.lora_A["default"].weight, layer2.lora_B["default"].weight, None,
                                             None, layer2.scaling["default"],
                                             dropout_mask(h.shape, 0.25, seed2, h.device, h.dtype))
    torch.testing.assert_close(y, want, rtol=2e-4, atol=2e-4)
    fused.eval()  # eval: no dropout, equal to PEFT's eval output
    peft_model = _peft_model(lora_dropout=0.25).eval()
    torch.testing.assert_close(fused(x), peft_model(x), rtol=2e-4, atol=2e-4)


def test_bf16_fused_equals_peft():
    peft_model = _peft_model(torch.bfloat16)
    fused = copy.deepcopy(peft_model)
    fuse_peft(fused)
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    _assert_same(_output_and_grads(fused, x), _output_and_grads(peft_model, x), torch.bfloat16)


def test_peft_features_work_around_fused_layers(tmp_path):
    peft_model, fused = _fused_pair()
    x = torch.randn(4, 24)
    with fused.disable_adapter():  # the frozen model alone
        y_disabled = fused(x)
    with peft_model.disable_adapter():
        torch.testing.assert_close(y_disabled, peft_model(x))

    # a second adapter, selected with set_adapter
    for model in (peft_model, fused):
        torch.manual_seed(1)
        model.add_adapter("second", LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=2))
        _randomise_b(model)
        model.set_adapter("second")
    y = fused(x)
    assert _computed_by_fused_op(y)
    torch.testing.assert_close(y, peft_model(x), rtol=2e-4, atol=2e-4)
    # two adapters active at once: PEFT's forward (sums them)
    for model in (peft_model, fused):
        model.base_model.set_adapter(["default", "second"])
    y = fused(x)
    assert not _computed_by_fused_op(y)
    torch.testing.assert_close(y, peft_model(x), rtol=2e-4, atol=2e-4)
    for model in (peft_model, fused):
        model.set_adapter("default")

    # save_pretrained / from_pretrained round trip
    fused.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16))
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    torch.testing.assert_close(reloaded(x), peft_model(x), rtol=2e-4, atol=2e-4)

    # merge_and_unload: plain nn.Linear layers holding W + ΔW
    want = peft_model(x)
    merged = fused.merge_and_unload()
    assert all(type(m) is nn.Linear for m in (merged[0], merged[2]))
    torch.testing.assert_close(merged(x), want, rtol=2e-4, atol=2e-4)


def test_unfuse_restores_peft_forward():
    peft_model, fused = _fused_pair()
    assert unfuse_peft(fused) == ["base_model.model.0", "base_model.model.2"]
    y = fused(torch.randn(2, 24))
    assert not _computed_by_fused_op(y)
    assert unfuse_peft(fused) == []


def test_gpt2_conv1d_fused_equals_peft():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()  # no dropout: the two runs see the same net
    peft_model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8))  # targets c_attn
    _randomise_b(peft_model)
    fused = copy.deepcopy(peft_model)
    report = fuse_peft(fused)
    assert report.fused == [f"base_model.model.transformer.h.{i}.attn.c_attn" for i in range(2)]
    ids = torch.randint(0, 64, (2, 7))

    def run(model):
        logits = model(input_ids=ids).logits
        logits.pow(2).mean().backward()
        return logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (y, grads), (y_want, grads_want) = run(fused), run(peft_model)
    torch.testing.assert_close(y, y_want, rtol=2e-4, atol=2e-4)
    for name in grads_want:
        torch.testing.assert_close(grads[name], grads_want[name], rtol=2e-4, atol=2e-5)


def test_layers_left_to_peft_say_why():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Embedding(5, 8))
    model = get_peft_model(base, LoraConfig(target_modules=["0"], r=2))
    model.add_adapter("dora", LoraConfig(target_modules=["2"], r=2, use_dora=True))
    model.add_adapter("embedding", LoraConfig(target_modules=["4"], r=2))
    report = fuse_peft(model)
    assert report.fused == ["base_model.model.0"]
    assert "LoRA variant" in report.left_to_peft["base_model.model.2"]
    assert "not PEFT's plain lora.Linear" in report.left_to_peft["base_model.model.4"]
    assert "left to PEFT: base_model.model.2" in str(report)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no PEFT LoRA or LoKr layer"):
        fuse_peft(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_peft(_peft_model(), backend="cuda")


def test_trainer_trains_a_fused_model_as_peft_does(tmp_path):
    """transformers.Trainer around a fused PEFT model: the same LoRA weights after a few steps as
    PEFT's own model, and they moved."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 12),
                                                                       generator=torch.Generator().manual_seed(0))]

    def train(fuse):
        torch.manual_seed(0)
        model = get_peft_model(transformers.GPT2LMHeadModel(config), LoraConfig(r=4, lora_alpha=8))
        _randomise_b(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if fuse:
            assert fuse_peft(model).fused
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fuse)), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
            use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
        return before, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    (before, fused), (_, peft_own) = train(True), train(False)
    assert fused.keys() == peft_own.keys() and len(fused) == 2
    for name in fused:
        torch.testing.assert_close(fused[name], peft_own[name], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(fused[name], before[name])
