"""load_dcft_checkpoint: the DCFT authors' lora_A / lora_B / lora_C state dicts give their outputs."""
import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS
from safetensors.torch import save_file
from torch import nn

from dcft_kernels import DCFTLinear, load_dcft_checkpoint

ALPHA, RANK, D = 16.0, 2, 4


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 22), nn.ReLU(), nn.Linear(22, 3))


def _their_checkpoint():
    """Layers 0 and 2 adapted (22 = 5·4 + 2: cropped), the classifier 4 fine-tuned whole."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, (n_in, n_out) in {"0": (32, 48), "2": (48, 22)}.items():
        state[f"{name}.lora_A"] = torch.randn(RANK, -(-n_in // D), generator=g)
        state[f"{name}.lora_B"] = torch.randn(-(-n_out // D), RANK, generator=g)
        state[f"{name}.lora_C"] = torch.randn(1, 1, D, D, generator=g)
    state["4.weight"] = torch.randn(3, 22, generator=g)
    state["4.bias"] = torch.randn(3, generator=g)
    return state


def _their_forward(base, state, x):
    """Their formula: the base layer plus (alpha/r) · x · conv_transpose2d((lora_B·lora_A)ᵀ, lora_C, stride=d)."""
    for i, layer in enumerate(base):
        if isinstance(layer, nn.Linear) and f"{i}.lora_A" in state:
            A, B, C = state[f"{i}.lora_A"], state[f"{i}.lora_B"], state[f"{i}.lora_C"]
            delta = F.conv_transpose2d((B @ A).T[None, None], C, stride=D)[0, 0]
            x = layer(x) + ALPHA / RANK * x @ delta[: layer.in_features, : layer.out_features]
        elif isinstance(layer, nn.Linear):
            x = F.linear(x, state[f"{i}.weight"], state[f"{i}.bias"])
        else:
            x = layer(x)
    return x


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_outputs_equal_their_formula(backend, tmp_path):
    state = _their_checkpoint()
    # A fixed input: with alpha/r = 8 the fp32 sums carry ~1e-4 relative rounding, so about 1 random
    # input in 100 put even reference.py past the tolerance against their fp32 formula.
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    want = _their_forward(_base(), state, x)
    path = tmp_path / "their.safetensors"
    save_file(state, str(path))
    model = load_dcft_checkpoint(_base(), path, alpha=ALPHA, backend=backend)
    assert isinstance(model[0], DCFTLinear) and isinstance(model[2], DCFTLinear)
    assert (model[0].kernel_size, model[0].rank, model[0].scaling) == (D, RANK, ALPHA / RANK)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_torch_load_files_and_refusals(tmp_path):
    state = _their_checkpoint()
    torch.save(state, tmp_path / "their.bin")
    x = torch.randn(2, 32)
    torch.testing.assert_close(load_dcft_checkpoint(_base(), tmp_path / "their.bin", alpha=ALPHA)(x),
                               _their_forward(_base(), state, x), rtol=1e-4, atol=1e-4)

    def refused(bad, match):
        model = _base()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises((ValueError, TypeError), match=match):
            load_dcft_checkpoint(model, bad, alpha=ALPHA)
        assert isinstance(model[0], nn.Linear)  # nothing injected
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    refused({k: v for k, v in state.items() if k != "2.lora_C"}, "needs lora_A, lora_B and lora_C")
    refused({**state, "0.lora_A": torch.zeros(RANK, 9)}, r"lora_A must be \(2, 8\)")
    refused({**state, "0.lora_C": torch.zeros(1, 1, 4, 3)}, r"lora_C must have shape \(1, 1, d, d\)")
    refused({**state, "9.lora_A": state["0.lora_A"], "9.lora_B": state["0.lora_B"], "9.lora_C": state["0.lora_C"]},
            "does not have")
    refused({**state, "1.lora_A": state["0.lora_A"], "1.lora_B": state["0.lora_B"], "1.lora_C": state["0.lora_C"]},
            "ReLU, not an nn.Linear")
    refused({**state, "classifier.weight": torch.zeros(3)}, "names nothing in the model")
    refused({**state, "4.bias": torch.zeros(4)}, r"shape \(4,\)")
    refused({"4.bias": torch.zeros(3)}, "no lora_A")
