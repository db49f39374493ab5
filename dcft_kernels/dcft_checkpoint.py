"""The DCFT authors' checkpoints, loaded into DCFTLinear modules.

Their layers (loralib style) hold, per adapted linear of ``in → out`` features, ``lora_A``
``(r, in/d)``, ``lora_B`` ``(out/d, r)`` and the deconvolution kernel ``lora_C`` ``(1, 1, d, d)``, and
add to the frozen layer's output

    scaling · x · conv_transpose2d((lora_B · lora_A)ᵀ, lora_C, stride=d)        (an in × out matrix)

with ``scaling = lora_alpha / r``. Transposed, that matrix is ``(lora_B·lora_A) ⊗ lora_Cᵀ``: our
``A`` and ``B`` are their ``lora_A`` and ``lora_B`` as they are, our ``kernel`` is ``lora_C[0, 0]ᵀ``
and our ``alpha`` is their ``lora_alpha``.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from .model import inject_adapters
from .modules import DCFTLinear, linear_dims
from .validation import factor_shapes

_KEY = re.compile(r"(.+)\.lora_([ABC])(?:\.weight)?")


def _read(checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        return checkpoint
    path = os.fspath(checkpoint)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_dcft_checkpoint(model: nn.Module, checkpoint, *, alpha: float, backend: str = "auto") -> nn.Module:
    """Load a DCFT authors' state dict into ``model``, injecting ``DCFTLinear`` where it has adapters.

    Args:
        model: the base model the checkpoint was trained from (module names as in the checkpoint).
        checkpoint: a state dict, or a path to one (``.bin`` / ``.pt`` via ``torch.load`` with
            ``weights_only=True``, or ``.safetensors``).
        alpha: their ``lora_alpha`` (not stored in their state dicts); ``scaling = alpha / r``.
        backend: backend of the injected modules.

    Every ``<module>.lora_A`` / ``lora_B`` / ``lora_C`` triple becomes that module's adapter; every other
    tensor (a fine-tuned classifier, say) must name a tensor of the model with the same shape and
    is copied into it. Everything is checked before the model changes. Returns ``model``.
    """
    state = _read(checkpoint)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, t in state.items():
        match = _KEY.fullmatch(key)
        if match:
            factors.setdefault(match[1], {})[match[2]] = t
        else:
            others[key] = t
    if not factors:
        raise ValueError("checkpoint has no lora_A / lora_B / lora_C tensors")

    sizes = set()
    for name, f in sorted(factors.items()):
        if set(f) != {"A", "B", "C"}:
            raise ValueError(f"module {name!r}: checkpoint has lora_{'/lora_'.join(sorted(f))}, needs lora_A, lora_B "
                             "and lora_C")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint adapts {name!r}, which the model does not have") from None
        dims = linear_dims(module)
        if dims is None:
            raise TypeError(f"checkpoint adapts {name!r}, a {type(module).__name__}, not an nn.Linear or Conv1D")
        C = f["C"]
        if C.dim() != 4 or C.shape[:2] != (1, 1) or C.shape[2] != C.shape[3]:
            raise ValueError(f"{name}.lora_C must have shape (1, 1, d, d), got {tuple(C.shape)}")
        d, rank = C.shape[2], f["A"].shape[0]
        in_features, out_features, _ = dims
        want_a, want_b = factor_shapes(in_features, out_features, rank, d)
        if tuple(f["A"].shape) != want_a or tuple(f["B"].shape) != want_b:
            raise ValueError(f"module {name!r} ({in_features} → {out_features}, d={d}, r={rank}): lora_A must be "
                             f"{want_a} and lora_B {want_b}, got {tuple(f['A'].shape)} and {tuple(f['B'].shape)}")
        sizes.add((d, rank))
    if len(sizes) > 1:
        raise ValueError(f"layers use different (kernel size, rank) pairs {sorted(sizes)}; one is supported")
    model_state = model.state_dict()
    for key, t in others.items():
        if key not in model_state:
            raise ValueError(f"checkpoint tensor {key!r} names nothing in the model")
        if model_state[key].shape != t.shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(model_state[key].shape)}")

    (d, rank), = sizes
    names = sorted(factors)
    inject_adapters(model, "dcft", target_modules="|".join(re.escape(n) for n in names), kernel_size=d, rank=rank,
                    alpha=alpha, backend=backend)
    with torch.no_grad():
        for name in names:
            module: DCFTLinear = model.get_submodule(name)
            module.A.copy_(factors[name]["A"])
            module.B.copy_(factors[name]["B"])
            module.kernel.copy_(factors[name]["C"][0, 0].T)
        for key, t in others.items():
            model_state[key].copy_(t)
    return model
