"""LoKr: our LoKrLinear and PEFT's LoKr layers fused onto the op (ΔW = K ⊗ (B·A), never built),
against PEFT's own dense kron, outputs and every gradient; MPC_n activations on our modules."""
import copy

import pytest
import torch
from conftest import FUSED_BACKENDS
from torch import nn

from dcft_kernels import (
    DCFTLinear,
    LoKrLinear,
    fuse_peft,
    inject_adapters,
    load_adapter,
    merge_adapters,
    reference,
    save_adapter,
)
from dcft_kernels.modules import kron_factors

peft = pytest.importorskip("peft")
from peft import LoKrConfig, get_peft_model  # noqa: E402
from peft.tuners.lokr.layer import factorization  # noqa: E402


def test_kron_factors_are_peft_factorization():
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 50):
            assert kron_factors(dim, factor) == factorization(dim, factor), (dim, factor)


OPTIONS = [
    {},
    {"decompose_both": True, "r": 2},
    {"r": 16},                      # w2 full: r ≥ max(out_k, in_n) / 2
    {"decompose_factor": 4, "r": 2},
]
IDS = ["default", "decompose_both", "w2_full", "factor4"]


def _peft_lokr(options, training=False, **dropouts):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 30))
    config = LoKrConfig(target_modules=["0", "2"], **{"r": 4, "alpha": 6, **options}, **dropouts)
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lokr" in name:  # PEFT starts w1 at 0; random everywhere so every gradient is nonzero
            nn.init.normal_(p, std=0.2)
    return model.train(training)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_lokr_linear_matches_peft_shapes_and_outputs(options):
    """Our LoKrLinear, given PEFT's tensors, computes PEFT's layer (and never builds ΔW)."""
    peft_model = _peft_lokr(options)
    layer = peft_model.base_model.model[0]
    ours = LoKrLinear.from_linear(copy.deepcopy(layer.get_base_layer()), rank=options.get("r", 4), alpha=6,
                                  decompose_both=options.get("decompose_both", False),
                                  decompose_factor=options.get("decompose_factor", -1))
    theirs = {n.split(".")[0]: p for n, p in layer.named_parameters() if n.startswith("lokr")}
    mapping = {"lokr_w1": "kernel", "lokr_w1_a": "kernel_a", "lokr_w1_b": "kernel_b", "lokr_w2": "B",
               "lokr_w2_a": "B", "lokr_w2_b": "A"}
    assert {mapping[k]: tuple(v.shape) for k, v in theirs.items()} == \
        {k: tuple(v.shape) for k, v in ours.factor_tensors().items()}
    with torch.no_grad():
        for key, p in theirs.items():
            getattr(ours, mapping[key]).copy_(p)
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def _outputs_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # the same module / rank dropout draws for both models
    y = model(x)
    y.pow(2).sum().backward()
    return y, x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
@pytest.mark.parametrize("dropouts", [{}, {"rank_dropout": 0.3, "module_dropout": 0.2},
                                      {"rank_dropout": 0.5, "rank_dropout_scale": True}], ids=["none", "rank+module",
                                                                                               "rank_scaled"])
def test_fused_peft_lokr_equals_peft(options, dropouts):
    peft_model = _peft_lokr(options, training=bool(dropouts), **dropouts)
    fused = copy.deepcopy(peft_model)
    assert fuse_peft(fused).fused == ["base_model.model.0", "base_model.model.2"]
    x = torch.randn(3, 7, 48)
    (y, dx, grads), (y_want, dx_want, grads_want) = _outputs_and_grads(fused, x), _outputs_and_grads(peft_model, x)
    assert "Kron" not in str(y.grad_fn) and "kron" not in str(y.grad_fn.next_functions)
    torch.testing.assert_close(y, y_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_want, rtol=1e-4, atol=1e-4)
    assert grads.keys() == grads_want.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_want[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_lokr_inject_save_load_merge(tmp_path):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 30))

    adapted = inject_adapters(model(), "lokr", target_modules=["0", "2"], rank=2, alpha=4, decompose_both=True)
    for p in adapted.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)
    x = torch.randn(4, 48)
    y = adapted(x)
    save_adapter(adapted, str(tmp_path))
    torch.testing.assert_close(load_adapter(model(), str(tmp_path))(x), y)
    merged = merge_adapters(adapted)
    assert type(merged[0]) is nn.Linear
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,kw", [(DCFTLinear, {"kernel_size": 4, "rank": 2, "init": "paper"}),
                                    (LoKrLinear, {"rank": 2})])
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_mpc_n_activation_on_modules(cls, kw, activation, backend):
    torch.manual_seed(0)
    layer = cls(20, 12, activation=activation, backend=backend, **kw)
    for p in layer.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 20)
    A, B, core, kernel = layer._factors()
    want = reference.kron_delta_linear(x, layer.weight, layer.bias, A, B, core, kernel, layer.scaling,
                                       order=layer.order, activation=activation)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    linear = reference.kron_delta_linear(x, layer.weight, layer.bias, A, B, core, kernel, layer.scaling,
                                         order=layer.order)
    assert not torch.allclose(want, linear, rtol=1e-3, atol=1e-3)  # the activation does act
    with pytest.raises(ValueError, match="depend on the input"):
        layer.merge()
    assert f"activation='{activation}'" in repr(layer)


def test_bad_lokr_options():
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        LoKrLinear(8, 8, rank_dropout=1.0)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        LoKrLinear(8, 8, activation="swish")
