"""PEFT's own LoRA and LoKr layers computed through the fused op.

``fuse_peft(peft_model)`` swaps the forward of each PEFT ``lora.Linear`` for one that computes
``x·Wᵀ + b + scaling · B·A·drop(x)`` with :func:`structured_delta_linear`, and of each
``lokr.Linear`` for ``x·Wᵀ + b + scaling · x·(w1 ⊗ w2)ᵀ`` in the LoKr order (``w2 = w2_a·w2_b`` is
``B·A``, ``w1`` the kernel) without building ``w1 ⊗ w2``, reading PEFT's own parameters (nothing is
copied or re-registered). The layer keeps its class, state dict and
methods, so PEFT works unchanged around it: ``save_pretrained``, ``from_pretrained``,
``merge_and_unload``, ``disable_adapter()``, ``set_adapter``, Trainer. At each call the fused path is
taken only when PEFT's own forward would be plain LoRA on one adapter; anything else (adapters
disabled or merged, several active adapters, ``adapter_names`` mixed batches, an input dtype
other than the weights') runs PEFT's forward. ``unfuse_peft`` restores PEFT's forward.

Dropout on the fused LoRA path draws its mask from the op's seeded Philox stream, not from PEFT's
``nn.Dropout``: the same distribution, not the same elements. LoKr's module and rank dropout draw
from torch's generator exactly as PEFT's forward does, so a fused LoKr layer trains on the very
same draws.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .functional import structured_delta_linear
from .modules import linear_dims

_FUSED = "_dcft_kernels_fused_backend"


@dataclass
class PeftFusion:
    """What ``fuse_peft`` did: the layers now fused, and the PEFT layers left to PEFT, with why."""

    fused: list[str] = field(default_factory=list)
    left_to_peft: dict[str, str] = field(default_factory=dict)

    def __str__(self):
        lines = [f"fused {len(self.fused)} PEFT layers"]
        lines += [f"  left to PEFT: {name}: {why}" for name, why in self.left_to_peft.items()]
        return "\n".join(lines)


def _why_lokr_not_fusable(layer) -> str | None:
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is a {type(base).__name__}, not nn.Linear"
    if layer.lokr_t2:
        return "the effective-conv (Tucker) w2 is not fused"
    return None


def _why_not_fusable(layer) -> str | None:
    """Why this PEFT LoRA or LoKr layer cannot take the fused path at all (None: it can)."""
    from peft.tuners.lokr.layer import Linear as PeftLoKrLinear
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    if type(layer) is PeftLoKrLinear:
        return _why_lokr_not_fusable(layer)
    if type(layer) is not PeftLoraLinear:
        return f"{type(layer).__module__}.{type(layer).__name__} is not PEFT's plain lora.Linear"
    base = layer.get_base_layer()
    dims = linear_dims(base)
    if dims is None or (type(base) is not nn.Linear and not dims[2]):
        return f"base layer is a {type(base).__name__} (quantised or custom), not nn.Linear or Conv1D"
    if dims[2] != bool(layer.fan_in_fan_out):
        return f"fan_in_fan_out={layer.fan_in_fan_out} does not match the {type(base).__name__} weight's layout"
    variants = sorted(getattr(layer, "lora_variant", {}))
    if variants:
        return f"adapters {variants} use a LoRA variant (DoRA, ...), which PEFT computes"
    if any(layer.lora_bias.values()):
        return "lora_bias=True is not fused"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _single_plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    weight = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D: a transposed view, no copy
    dropout = self.lora_dropout[adapter]
    p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
    return structured_delta_linear(x, weight, base.bias, self.lora_A[adapter].weight,
                                   self.lora_B[adapter].weight, scaling=float(self.scaling[adapter]),
                                   dropout=p, backend=getattr(self, _FUSED))


def _fused_lokr_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    active = [a for a in self.active_adapters if a in self._available_adapters]
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or any(t.dtype != x.dtype for t in _lokr_tensors(self, active[0]))):
        return type(self).forward(self, x, *args, **kwargs)
    adapter = active[0]
    # PEFT's draws, in PEFT's order: the module-dropout coin (drawn in every training call), then
    # the rank-dropout rows.
    if self.training and not torch.rand(1) > self.module_dropout[adapter]:
        return base(x)
    kernel = (self.lokr_w1[adapter] if adapter in self.lokr_w1
              else self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter])
    if adapter in self.lokr_w2:  # w2 full: B = w2 and A the identity
        B = self.lokr_w2[adapter]
        A = torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
    else:
        A, B = self.lokr_w2_b[adapter], self.lokr_w2_a[adapter]
    row_scale = None
    if self.training and self.rank_dropout[adapter]:
        row_scale = (torch.rand(base.weight.shape[0]) > self.rank_dropout[adapter]).float()
        if self.rank_dropout_scale[adapter]:
            row_scale /= row_scale.mean()
        row_scale = row_scale.to(device=x.device, dtype=x.dtype)
    backend = "reference" if getattr(self, _FUSED) == "reference" else "auto"
    return structured_delta_linear(x, base.weight, base.bias, A, B, None, kernel, scaling=float(self.scaling[adapter]),
                                   order="lokr", row_scale=row_scale, backend=backend)


def _lokr_tensors(layer, adapter):
    """The LoKr factors of ``adapter`` and the base weight (their dtypes must match the input's)."""
    return [p[adapter] for p in (layer.lokr_w1, layer.lokr_w1_a, layer.lokr_w1_b, layer.lokr_w2, layer.lokr_w2_a,
                                 layer.lokr_w2_b) if adapter in p] + [layer.get_base_layer().weight]


def _single_plain_adapter(layer, x, args, kwargs) -> str | None:
    """The one adapter this call computes as plain LoRA, or None for PEFT's own forward."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    adapter = active[0]
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return None
    dtype = layer.get_base_layer().weight.dtype
    if x.dtype != dtype or layer.lora_A[adapter].weight.dtype != dtype or layer.lora_B[adapter].weight.dtype != dtype:
        return None
    return adapter


def fuse_peft(model: nn.Module, backend: str = "auto") -> PeftFusion:
    """Make PEFT's LoRA and LoKr ``Linear`` layers in ``model`` compute through the fused op, in place.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers).
        backend: backend of the op, as in :func:`structured_delta_linear`.

    ``nn.Linear`` and GPT-2's ``Conv1D`` bases are fused. Returns a :class:`PeftFusion` naming the
    fused layers and, for every PEFT LoRA layer left to PEFT (DoRA and other variants, quantised
    bases, LoRA bias, embedding and conv layers), the reason.
    LoKr layers run the LoKr order through the backend's primitives (the fused whole-layer passes
    cover the DCFT order only).
    Raises ``ImportError`` without peft, ``ValueError`` when ``model`` has no PEFT LoRA or LoKr layer.
    """
    from peft.tuners.lokr.layer import Linear as PeftLoKrLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    from .autograd import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    report = PeftFusion()
    for name, module in model.named_modules():
        if not isinstance(module, (LoraLayer, LycorisLayer)):
            continue
        why = _why_not_fusable(module) if isinstance(module, (LoraLayer, PeftLoKrLinear)) else \
            f"{type(module).__module__}.{type(module).__name__} is not a LoRA or LoKr Linear"
        if why is not None:
            report.left_to_peft[name] = why
            continue
        setattr(module, _FUSED, backend)
        lokr = isinstance(module, PeftLoKrLinear)
        module.forward = types.MethodType(_fused_lokr_forward if lokr else _fused_forward, module)
        report.fused.append(name)
    if not report.fused and not report.left_to_peft:
        raise ValueError(f"{type(model).__name__} has no PEFT LoRA or LoKr layer to fuse")
    return report


def unfuse_peft(model: nn.Module) -> list[str]:
    """Give the layers ``fuse_peft`` changed their PEFT forward back; returns their names."""
    restored = []
    for name, module in model.named_modules():
        if hasattr(module, _FUSED):
            del module.forward
            delattr(module, _FUSED)
            restored.append(name)
    return restored
