"""Whole-model use on a small transformers model built from a config (no download)."""
import copy

import pytest
import torch
from torch import nn

from conftest import FUSED_BACKENDS
from dcft_kernels import (
    AdaptedLinear,
    DCFTLinear,
    LoRALinear,
    count_trainable_parameters,
    inject_adapters,
    load_adapter,
    load_peft_lora,
    merge_adapters,
    orthogonality_loss,
    print_trainable_parameters,
    save_adapter,
    unmerge_adapters,
)
from dcft_kernels.autograd import is_available

transformers = pytest.importorskip("transformers")
TARGETS = ["query", "key", "value", "dense"]


def tiny_bert(seed=0, hidden=32):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * hidden + 6, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (4, 12), generator=g)


def logits(model, ids):
    return model(input_ids=ids).logits


def randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedLinear):
                for name in ("A", "B", "core", "kernel"):
                    t = getattr(m, name, None)
                    if t is not None:
                        t.copy_(torch.randn(t.shape, generator=g) * 0.2)


@pytest.mark.parametrize("method", ["dcft", "lora", "delora"])
def test_inject_replaces_shares_and_freezes(method):
    model = tiny_bert()
    ids = batch()
    before = logits(model, ids)
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inject_adapters(model, method, target_modules=TARGETS, modules_to_save=["classifier"], rank=2)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert len(adapted) == 2 * 6 + 1  # q, k, v, attn-out, ffn-in, ffn-out per layer, plus the pooler
    assert all(m.weight is weights[n] for n, m in adapted.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".A" in n or ".B" in n or ".kernel" in n or ".core" in n or n.startswith("classifier")
                             for n in trainable)
    assert "classifier.weight" in trainable
    torch.testing.assert_close(logits(model, ids), before)  # every adapter starts at ΔW = 0
    t, total = count_trainable_parameters(model)
    assert 0 < t < total


def test_regex_targets_and_print(capsys):
    model = inject_adapters(tiny_bert(), "dcft", target_modules=r".*attention\.self\.(query|value)", kernel_size=4)
    assert sum(isinstance(m, DCFTLinear) for m in model.modules()) == 4
    print_trainable_parameters(model)
    assert "trainable params:" in capsys.readouterr().out


def test_inject_errors():
    with pytest.raises(ValueError, match="matched no module"):
        inject_adapters(tiny_bert(), "dcft", target_modules=["nonexistent"])
    with pytest.raises(TypeError, match="only nn.Linear"):
        inject_adapters(tiny_bert(), "dcft", target_modules=["word_embeddings"])
    with pytest.raises(ValueError, match="method must be"):
        inject_adapters(tiny_bert(), "ia3", target_modules=TARGETS)
    with pytest.raises(TypeError, match="unexpected"):
        inject_adapters(tiny_bert(), "lora", target_modules=TARGETS, kernel_size=4)


@pytest.mark.parametrize("method", ["dcft", "lora", "delora"])
def test_save_load_round_trip_is_bit_exact(tmp_path, method):
    model = inject_adapters(tiny_bert(), method, target_modules=TARGETS, modules_to_save=["classifier"], rank=2)
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    ids = batch()
    want = logits(model, ids)
    save_adapter(model, tmp_path)

    fresh = tiny_bert()  # same pretrained weights, no adapter
    load_adapter(fresh, tmp_path)
    for (n1, t1), (n2, t2) in zip(sorted(model.state_dict().items()), sorted(fresh.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert torch.equal(logits(fresh, ids), want)


def test_load_into_wrong_model_fails_and_changes_nothing(tmp_path):
    model = inject_adapters(tiny_bert(), "dcft", target_modules=TARGETS, kernel_size=4)
    randomize_adapters(model)
    save_adapter(model, tmp_path)

    wrong = tiny_bert(hidden=48)
    state = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        load_adapter(wrong, tmp_path)
    assert not any(isinstance(m, AdaptedLinear) for m in wrong.modules())
    assert all(torch.equal(state[k], v) for k, v in wrong.state_dict().items())

    lora_model = inject_adapters(tiny_bert(), "lora", target_modules=TARGETS)
    with pytest.raises(ValueError, match="lora adapters"):
        load_adapter(lora_model, tmp_path)


def test_merge_unload_and_unmerge():
    model = inject_adapters(tiny_bert(), "dcft", target_modules=TARGETS, kernel_size=4, rank=2)
    randomize_adapters(model)
    ids = batch()
    want = logits(model, ids)
    merge_adapters(model, unload=False)
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)
    merge_adapters(model)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)


def test_orthogonality_loss_over_injected_model():
    model = inject_adapters(tiny_bert(), "dcft", target_modules=TARGETS, kernel_size=4)
    loss = orthogonality_loss(model, squared=False, reduction="mean")
    loss.backward()
    assert loss.item() > 0 and model.bert.encoder.layer[0].attention.self.query.A.grad is not None


def test_peft_lora_import_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(base, config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path)
    ids = batch()
    want = logits(peft_model, ids)

    ours = load_peft_lora(tiny_bert(), tmp_path)
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 4
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])
@pytest.mark.parametrize("method", ["dcft", "lora", "delora"])
def test_torch_compile_fullgraph(method, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16))
    inject_adapters(model, method, target_modules=["0", "2"], backend=backend, rank=2)
    randomize_adapters(model)
    x = torch.randn(5, 24, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_eager, y_compiled = model(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager)
    params = [p for p in model.parameters() if p.requires_grad]
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, *params])
    g_compiled = torch.autograd.grad(y_compiled.square().sum(), [x, *params])
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_default_backend():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = inject_adapters(nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16)), "dcft",
                            target_modules=["0", "2"], kernel_size=4)
    randomize_adapters(model)
    x = torch.randn(5, 24)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model[0].kernel.grad is not None


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])
def test_torch_compile_fullgraph_with_dropout(backend):
    """Training with dropout compiles without a graph break and draws a fresh mask every call:
    the compiled layer equals the eager op run with the seed the compiled code drew."""
    import random

    from dcft_kernels import structured_delta_linear

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DCFTLinear(24, 16, kernel_size=4, rank=2, dropout=0.3, init="paper", backend=backend).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 24)
    random.seed(1)
    y1, y2 = compiled(x), compiled(x)
    assert not torch.allclose(y1, y2)
    draws = random.Random(1)
    for y in (y1, y2):
        seed = draws.randrange(2**31 - 1)
        want = structured_delta_linear(x, layer.weight, layer.bias, layer.A, layer.B, None, layer.kernel,
                                       scaling=layer.scaling, dropout=0.3, seed=seed, backend=backend)
        torch.testing.assert_close(y, want)
    y1.sum().backward()
    assert layer.A.grad is not None and layer.kernel.grad is not None


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("backend", ["torch", "cpp", "reference"])
def test_gpt2_conv1d_adapted_in_place_without_copy(backend, tmp_path):
    """GPT-2's Conv1D (weight stored in × out): the default targets (c_attn, from PEFT's mapping)
    are adapted reading the weight through a view; outputs equal the dense W + ΔWᵀ model."""
    if backend == "cpp" and not is_available("cpp"):
        pytest.skip("C++ extension not built")
    pytest.importorskip("peft")
    model = _tiny_gpt2()
    dense = copy.deepcopy(model)
    weights = [model.transformer.h[i].attn.c_attn.weight for i in range(2)]
    inject_adapters(model, "dcft", kernel_size=4, rank=2, init="paper", backend=backend)
    assert model.dcft_kernels_config["target_modules"] == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    for i in range(2):
        layer = model.transformer.h[i].attn.c_attn
        assert layer.weight is weights[i] and layer.weight_is_in_by_out
        assert (layer.in_features, layer.out_features) == (32, 96)
        with torch.no_grad():
            dense.transformer.h[i].attn.c_attn.weight += layer.delta_weight().T
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    save_adapter(model, str(tmp_path))
    reloaded = load_adapter(_tiny_gpt2(), str(tmp_path))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    merge_adapters(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_all_linear_targets_skip_the_output_layer():
    model = inject_adapters(_tiny_gpt2(), "lora", target_modules="all-linear", rank=2)
    names = model.dcft_kernels_config["target_modules"]
    assert len(names) == 2 * 4 and "lm_head" not in names  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    plain = inject_adapters(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lora",
                            target_modules="all-linear", modules_to_save=["2"], rank=1)
    assert plain.dcft_kernels_config["target_modules"] == ["0"]


def test_no_default_targets_for_an_unknown_model():
    with pytest.raises(ValueError, match="target_modules not given"):
        inject_adapters(nn.Sequential(nn.Linear(4, 4)), "dcft")
