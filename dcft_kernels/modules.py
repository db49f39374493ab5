"""Drop-in ``nn.Linear`` replacements: DCFTLinear, LoRALinear, DeLoRALinear.

The modules hold parameters and configuration only; the math lives in
``functional.structured_delta_linear``. Each keeps ``nn.Linear``'s ``weight``,
``bias``, ``in_features`` and ``out_features`` (frozen), adds a small trained
delta, and can be built fresh or from an existing ``nn.Linear`` (or GPT-2's
``transformers.Conv1D``, whose weight is stored ``in × out``) whose weight it
shares (not copies).
"""
from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import BACKENDS
from .functional import structured_delta_linear, structured_delta_weight


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, weight_is_in_by_out)`` of an ``nn.Linear`` or a transformers
    ``Conv1D`` (GPT-2's linear, weight stored ``in × out``); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    transformers_utils = sys.modules.get("transformers.pytorch_utils")  # a Conv1D exists only once imported
    if transformers_utils is not None and isinstance(module, transformers_utils.Conv1D):
        return module.weight.shape[0], module.weight.shape[1], True
    return None


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _warn_useless_sizes(layer: str, in_features, out_features, rank, d=1):
    """Sizes that are accepted but leave parameters that can never change ΔW: say so, with the maximum."""
    if not all(isinstance(v, int) and v > 0 for v in (in_features, out_features, rank, d)):
        return  # invalid sizes get their ValueError from the constructor
    if d > min(in_features, out_features):
        smallest = min(in_features, out_features)
        warnings.warn(f"{layer}: kernel_size={d} exceeds min(in_features, out_features)={smallest}; the kernel's "
                      "entries beyond it are cropped away and never train", stacklevel=3)
    most = min(-(-in_features // d), -(-out_features // d))
    if rank > most:
        warnings.warn(f"{layer}: rank={rank} exceeds the largest useful rank {most} (min(⌈in/d⌉, ⌈out/d⌉) for "
                      f"in={in_features}, out={out_features}, d={d}); the extra rank adds no expressiveness",
                      stacklevel=3)


class AdaptedLinear(nn.Module):
    """Common base: a frozen ``nn.Linear`` plus ``scaling · (B·C·A) ⊗ K``.

    Subclasses register their factors and implement ``_factors()`` and
    ``reset_parameters()`` (which resets the adapter only, never the frozen weight).
    """

    def __init__(self, in_features, out_features, *, bias, scaling, dropout, backend, base, device, dtype):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if base is None:
            base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        dims = linear_dims(base)
        if dims is None:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        # Conv1D keeps its weight `in × out`; the op reads it through a transposed view, never a copy.
        self.weight_is_in_by_out = dims[2]
        # Shared with `base`, not copied: merging writes through to the original layer.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.backend = backend
        self.merged = False

    def weight_out_in(self) -> torch.Tensor:
        """The frozen weight as ``out × in`` (a transposed view for a Conv1D base, no copy)."""
        return self.weight.t() if self.weight_is_in_by_out else self.weight

    def _factor_kwargs(self):
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def _factors(self):
        """(A, B, core or None, kernel or None) of ΔW = scaling · (B·C·A) ⊗ K."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight_out_in(), self.bias)
        A, B, core, kernel = self._factors()
        return structured_delta_linear(
            x, self.weight_out_in(), self.bias, A, B, core, kernel,
            scaling=self.scaling, dropout=self.dropout if self.training else 0.0, backend=self.backend,
        )

    def delta_weight(self) -> torch.Tensor:
        """ΔW (``out × in``) built densely; for merging and inspection, never used in forward."""
        A, B, core, kernel = self._factors()
        return structured_delta_weight(A, B, core, kernel, self.out_features, self.in_features, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into ``weight`` in place; forward then costs exactly an ``nn.Linear``."""
        if self.merged:
            warnings.warn("merge(): adapter is already merged; nothing done", stacklevel=2)
            return
        self.weight_out_in().add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from ``weight`` in place, restoring the frozen weight (to rounding)."""
        if not self.merged:
            warnings.warn("unmerge(): adapter is not merged; nothing done", stacklevel=2)
            return
        self.weight_out_in().sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    @property
    def trainable_parameters(self) -> int:
        """Number of parameters that require grad (the adapter's, by default)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _adapter_repr(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        layout = ", weight_is_in_by_out=True" if self.weight_is_in_by_out else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{layout}, "
            f"{self._adapter_repr()}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"backend={self.backend!r}, merged={self.merged}"
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, **config):
        """Wrap an existing ``nn.Linear`` or transformers ``Conv1D``, sharing (not copying) its weight and bias.

        The shared weight and bias are frozen (``requires_grad=False``) in place.
        ``config`` takes the same keywords as the constructor.
        """
        dims = linear_dims(linear)
        if dims is None:
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        return cls(dims[0], dims[1], bias=linear.bias is not None, _base=linear, **config)


class DCFTLinear(AdaptedLinear):
    """``nn.Linear`` + DCFT delta: ``ΔW = scaling · ConvTranspose2d(B·A, kernel, stride=d)``.

    With stride equal to the kernel size d, the transposed convolution is the
    Kronecker product ``(B·A) ⊗ kernel``, cropped to ``out × in``; it is computed
    without ever building ΔW.

    Args:
        in_features, out_features: as ``nn.Linear``.
        kernel_size: d (default 8). rank: r of ``B·A`` (default 1).
        alpha: if given, ``scaling = alpha / rank``; else ``scaling = 1``.
        dropout: dropout on the adapter branch's input only.
        init: ``"zero"`` (default): ``B = 0``, A and kernel Kaiming-uniform, so ΔW = 0 at step 0
            (the layer equals the frozen one) while B gets a gradient at once and A and the kernel
            from the second step on. ``"paper"``: A, B and kernel all ``normal(0, 0.02)``, as the
            authors' code does (ΔW ≠ 0 at step 0).
        backend: "auto", "torch", "triton", "cpp" or "reference".

    Parameters ``A`` ``(r, ⌈in/d⌉)``, ``B`` ``(⌈out/d⌉, r)``, ``kernel`` ``(d, d)``.

    The authors' checkpoints (``lora_A``, ``lora_B``, ``lora_C``) load with ``load_dcft_checkpoint``:
    our ``A``, ``B`` are their ``lora_A``, ``lora_B``, our ``kernel`` is ``lora_C[0, 0]ᵀ`` and their
    ``lora_alpha`` is our ``alpha``.
    """

    def __init__(self, in_features, out_features, kernel_size=8, rank=1, alpha=None, dropout=0.0, bias=True,
                 *, init="zero", backend="auto", device=None, dtype=None, _base=None):
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.rank = _positive_int("rank", rank)
        if init not in ("zero", "paper"):
            raise ValueError(f"init must be 'zero' or 'paper', got {init!r}")
        self.alpha = alpha
        self.init = init
        _warn_useless_sizes("DCFTLinear", in_features, out_features, rank, kernel_size)
        scaling = 1.0 if alpha is None else alpha / rank
        super().__init__(in_features, out_features, bias=bias, scaling=scaling, dropout=dropout,
                         backend=backend, base=_base, device=device, dtype=dtype)
        d = kernel_size
        kw = self._factor_kwargs()
        self.A = nn.Parameter(torch.empty(rank, math.ceil(in_features / d), **kw))
        self.B = nn.Parameter(torch.empty(math.ceil(out_features / d), rank, **kw))
        self.kernel = nn.Parameter(torch.empty(d, d, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the adapter (A, B, kernel) per ``init``; the frozen weight is untouched."""
        if self.init == "paper":
            for p in (self.A, self.B, self.kernel):
                nn.init.normal_(p, 0.0, 0.02)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    def _factors(self):
        return self.A, self.B, None, self.kernel

    def _adapter_repr(self):
        return f"kernel_size={self.kernel_size}, rank={self.rank}, init={self.init!r}"


class LoRALinear(AdaptedLinear):
    """``nn.Linear`` + LoRA delta ``ΔW = (alpha / rank) · B·A`` (``alpha / √rank`` with ``rslora``).

    Parameters ``A`` ``(r, in)`` (Kaiming-uniform) and ``B`` ``(out, r)`` (zeros), as in PEFT,
    so the layer equals the frozen one at step 0.
    """

    def __init__(self, in_features, out_features, rank=8, alpha=16, dropout=0.0, bias=True,
                 *, rslora=False, backend="auto", device=None, dtype=None, _base=None):
        self.rank = _positive_int("rank", rank)
        self.alpha = alpha
        self.rslora = bool(rslora)
        _warn_useless_sizes("LoRALinear", in_features, out_features, rank)
        scaling = alpha / math.sqrt(rank) if self.rslora else alpha / rank
        super().__init__(in_features, out_features, bias=bias, scaling=scaling, dropout=dropout,
                         backend=backend, base=_base, device=device, dtype=dtype)
        kw = self._factor_kwargs()
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform, B zeros; the frozen weight is untouched."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def _factors(self):
        return self.A, self.B, None, None

    def _adapter_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}" + (", rslora=True" if self.rslora else "")


class DeLoRALinear(AdaptedLinear):
    """``nn.Linear`` + decomposition-based DeLoRA delta ``ΔW = (alpha / rank) · B·Σ·A``.

    This is the DeLoRA of the WashU report (LoRA with frozen random A, B and a trained Σ): A ``(r, in)`` and
    B ``(out, r)`` are frozen at random values (buffers, Kaiming-uniform like LoRA's A) and
    only the ``r × r`` ``core`` Σ is trained, starting at zero so the layer equals the frozen
    one at step 0. It is *not* HF PEFT's ``DeloraConfig`` (Bini et al. 2025), an unrelated
    method that happens to share the name.
    """

    def __init__(self, in_features, out_features, rank=8, alpha=16, dropout=0.0, bias=True,
                 *, backend="auto", device=None, dtype=None, _base=None):
        self.rank = _positive_int("rank", rank)
        self.alpha = alpha
        _warn_useless_sizes("DeLoRALinear", in_features, out_features, rank)
        super().__init__(in_features, out_features, bias=bias, scaling=alpha / rank, dropout=dropout,
                         backend=backend, base=_base, device=device, dtype=dtype)
        kw = self._factor_kwargs()
        self.register_buffer("A", torch.empty(rank, in_features, **kw))
        self.register_buffer("B", torch.empty(out_features, rank, **kw))
        self.core = nn.Parameter(torch.empty(rank, rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Redraw the frozen A, B (Kaiming-uniform) and zero the core; the frozen weight is untouched."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.zeros_(self.core)

    def _factors(self):
        return self.A, self.B, self.core, None

    def _adapter_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}"
