"""Adapter files and models that cannot be silently lost or corrupted: all-or-nothing loads,
atomic saves, clear errors for broken files, save_pretrained round trips, validate-then-change."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcft_kernels import (
    DCFTLinear,
    LoRALinear,
    from_pretrained,
    inject_adapters,
    load_adapter,
    load_peft_lora,
    merge_adapters,
    save_adapter,
    structured_delta_linear,
    structured_delta_weight,
)
from dcft_kernels import model as model_module
from test_model import TARGETS, batch, logits, randomize_adapters, tiny_bert

transformers = pytest.importorskip("transformers")


def snapshot(model):
    """Every parameter and buffer by name, and the module types: what 'unchanged' means."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    return state, grads, types


def assert_unchanged(model, snap):
    state, grads, types = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: type(m) for n, m in model.named_modules()} == types


def assert_refused(model, load, match, error=ValueError):
    """``load()`` raises ``error`` matching ``match`` and leaves ``model`` exactly as it was."""
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        load()
    assert_unchanged(model, snap)


def saved(tmp_path, method="dcft", **options):
    model = tiny_bert()
    inject_adapters(model, method, target_modules=TARGETS, modules_to_save=["classifier"], **options)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


# ---- load: validated against the model, applied all at once or not at all --------------------------

@pytest.mark.parametrize("file_options,model_options,match", [
    (dict(rank=1), dict(rank=2), "rank"),
    (dict(kernel_size=4), dict(kernel_size=2), "kernel_size"),
])
def test_option_mismatch_with_an_injected_model_is_refused(tmp_path, file_options, model_options, match):
    _, path = saved(tmp_path, **file_options)
    model = inject_adapters(tiny_bert(), "dcft", target_modules=TARGETS, modules_to_save=["classifier"],
                            **model_options)
    assert_refused(model, lambda: load_adapter(model, path), match)


def test_lora_alpha_mismatch_is_refused(tmp_path):
    _, path = saved(tmp_path, "lora", rank=2, alpha=16)
    model = inject_adapters(tiny_bert(), "lora", target_modules=TARGETS, modules_to_save=["classifier"], rank=2,
                            alpha=8)
    assert_refused(model, lambda: load_adapter(model, path), "alpha=8.*16")


@pytest.mark.parametrize("drop", ["kernel", "A", "B", "classifier.bias"])
def test_missing_tensor_is_refused(tmp_path, drop):
    _, path = saved(tmp_path)
    weights = path / model_module.WEIGHTS_NAME
    tensors = load_file(weights)
    victim = next(k for k in tensors if k.endswith("." + drop) or k == drop)
    del tensors[victim]
    save_file(tensors, weights)
    for fresh in (tiny_bert(), inject_adapters(tiny_bert(), "dcft", target_modules=TARGETS,
                                                modules_to_save=["classifier"])):
        assert_refused(fresh, lambda fresh=fresh: load_adapter(fresh, path), "missing tensor")


def test_extra_tensor_is_refused_before_anything_changes(tmp_path):
    _, path = saved(tmp_path)
    weights = path / model_module.WEIGHTS_NAME
    tensors = load_file(weights)
    first = next(k for k in tensors if k.endswith(".A")).rpartition(".")[0]
    tensors[f"{first}.core"] = torch.zeros(1, 1)
    save_file(tensors, weights)
    model = tiny_bert()
    # not injected, nothing frozen
    assert_refused(model, lambda: load_adapter(model, path), "belongs to no adapter")


def test_dtype_mismatch_is_refused(tmp_path):
    _, path = saved(tmp_path)
    model = tiny_bert().to(torch.float64)
    assert_refused(model, lambda: load_adapter(model, path), "dtype")


def test_loading_into_a_merged_model_is_refused(tmp_path):
    model, path = saved(tmp_path)
    merge_adapters(model, unload=False)
    assert_refused(model, lambda: load_adapter(model, path), "merged")


def test_round_trip_is_exact_into_an_injected_model(tmp_path):
    model, path = saved(tmp_path, rank=2)
    target = inject_adapters(tiny_bert(), "dcft", target_modules=TARGETS, modules_to_save=["classifier"], rank=2)
    load_adapter(target, path)
    ids = batch()
    torch.testing.assert_close(logits(target, ids), logits(model, ids), rtol=0, atol=0)


# ---- files -----------------------------------------------------------------------------------------

def test_save_is_atomic_and_the_old_adapter_survives_a_failure(tmp_path, monkeypatch):
    model, path = saved(tmp_path)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    randomize_adapters(model, seed=9)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module.json, "dump", crash)  # after the weights, before the config
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directory left behind
    monkeypatch.undo()
    save_adapter(model, path)  # and a good save replaces it
    load_adapter(tiny_bert(), path)


@pytest.mark.parametrize("broken", ["truncated weights", "garbage config", "no target_modules", "no file"])
def test_broken_files_are_named_in_a_clear_error(tmp_path, broken):
    _, path = saved(tmp_path)
    weights, config = path / model_module.WEIGHTS_NAME, path / model_module.CONFIG_NAME
    if broken == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
        error, match = ValueError, "adapter_model.safetensors is not a valid adapter file"
    elif broken == "garbage config":
        config.write_text("{not json")
        error, match = ValueError, "adapter_config.json is not a valid adapter config"
    elif broken == "no target_modules":
        data = json.loads(config.read_text())
        del data["target_modules"]
        config.write_text(json.dumps(data))
        error, match = ValueError, "'target_modules' must be a non-empty list"
    else:
        os.remove(weights)
        error, match = FileNotFoundError, "not an adapter saved by save_adapter"
    model = tiny_bert()
    assert_refused(model, lambda: load_adapter(model, path), match, error=error)


def test_transformers_save_pretrained_round_trips_through_from_pretrained(tmp_path):
    model = tiny_bert()
    inject_adapters(model, "dcft", target_modules=TARGETS, modules_to_save=["classifier"], kernel_size=4)
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    ids = batch()
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "hf")

    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert not torch.allclose(logits(plain, ids), want)  # transformers alone drops the adapter

    restored = from_pretrained(transformers.BertForSequenceClassification, tmp_path / "hf").eval()
    assert sum(isinstance(m, DCFTLinear) for m in restored.modules()) == sum(
        isinstance(m, DCFTLinear) for m in model.modules())
    torch.testing.assert_close(logits(restored, ids), want, rtol=0, atol=0)
    assert restored.classifier.weight.requires_grad  # modules_to_save stay trainable


def test_from_pretrained_without_an_adapter_is_a_clear_error(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="records no dcft_kernels adapter"):
        from_pretrained(transformers.BertForSequenceClassification, tmp_path / "hf")


def test_peft_rslora_and_modules_to_save_survive_save_and_load(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(tiny_bert(), config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = batch()
    want = logits(peft_model, ids)
    ours = load_peft_lora(tiny_bert(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)
    assert all(m.scaling == pytest.approx(8 / 2) for m in ours.modules() if isinstance(m, LoRALinear))

    save_adapter(ours, tmp_path / "ours")
    again = load_adapter(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(logits(again, ids), want, rtol=1e-5, atol=1e-5)


# ---- inject validates before it changes anything ----------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(kernel_size=0), "kernel_size"), (dict(rank=-1), "rank"), (dict(dropout=2.0), "dropout"),
    (dict(backend="gpu"), "backend"),
])
def test_inject_with_a_bad_option_changes_nothing(options, match):
    model = tiny_bert()
    assert_refused(model, lambda: inject_adapters(model, "dcft", target_modules=TARGETS, **options), match)


# ---- the op ----------------------------------------------------------------------------------------

def test_non_contiguous_kernel_builds_the_dense_delta():
    A, B, K = torch.randn(2, 3), torch.randn(4, 2), torch.randn(3, 3)
    torch.testing.assert_close(structured_delta_weight(A, B, None, K.t()),
                               structured_delta_weight(A, B, None, K.t().contiguous()))


def test_zero_in_features_is_a_clear_error():
    x = torch.randn(3, 0)
    with pytest.raises(ValueError, match="in_features >= 1"):
        structured_delta_linear(x, torch.randn(4, 0), None, torch.randn(1, 0), torch.randn(4, 1))


@pytest.mark.parametrize("make,match", [
    (lambda: DCFTLinear(6, 40, kernel_size=8), "kernel_size=8 exceeds min"),
    (lambda: LoRALinear(6, 40, rank=8), "rank=8 exceeds the largest useful rank 6"),
    (lambda: DCFTLinear(64, 64, kernel_size=8, rank=9), "rank=9 exceeds the largest useful rank 8"),
])
def test_sizes_that_cannot_train_warn_with_the_useful_maximum(make, match):
    with pytest.warns(UserWarning, match=match):
        make()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("case", ["x·Wᵀ overflows", "A·x overflows"])
def test_fp16_accumulates_in_fp32_and_rounds_once(backend, case):
    """y is finite in fp16 although a partial product is not: the answer is the dense fp16 one."""
    from conftest import FUSED_BACKENDS

    if backend not in FUSED_BACKENDS:
        pytest.skip(f"{backend} backend unavailable")
    h = torch.float16
    x = torch.tensor([[256.0]], dtype=h)
    if case == "x·Wᵀ overflows":  # 256·275 = 70,400 > 65,504; 256·(275 − 37.5) = 60,800
        W, A, B = torch.tensor([[275.0]], dtype=h), torch.tensor([[1.0]], dtype=h), torch.tensor([[-37.5]], dtype=h)
    else:  # T = 300·256 = 76,800 overflows; y = 0.5·T = 38,400 does not
        W, A, B = torch.tensor([[0.0]], dtype=h), torch.tensor([[300.0]], dtype=h), torch.tensor([[0.5]], dtype=h)
    dense = torch.nn.functional.linear(x, W + structured_delta_weight(A, B))
    assert torch.isfinite(dense).all()
    y = structured_delta_linear(x, W, None, A, B, backend=backend)
    assert torch.equal(y, dense), (y, dense)
