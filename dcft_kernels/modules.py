"""Drop-in ``nn.Linear`` replacements: DCFTLinear, LoRALinear, DeLoRALinear, LoKrLinear.

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
from .validation import ACTIVATIONS, factor_shapes
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
    (_, n_in), (n_out, _) = factor_shapes(in_features, out_features, rank, d)
    most = min(n_in, n_out)
    if rank > most:
        warnings.warn(f"{layer}: rank={rank} exceeds the largest useful rank {most} (min(⌈in/d⌉, ⌈out/d⌉) for "
                      f"in={in_features}, out={out_features}, d={d}); the extra rank adds no expressiveness",
                      stacklevel=3)


class AdaptedLinear(nn.Module):
    """Common base: a frozen ``nn.Linear`` plus ``scaling · (B·C·A) ⊗ K``.

    Subclasses register their factors and implement ``_factors()`` and
    ``reset_parameters()`` (which resets the adapter only, never the frozen weight).
    """

    order = "dcft"  # ΔW = (B·C·A) ⊗ K; LoKrLinear is the other order

    def __init__(self, in_features, out_features, *, bias, scaling, dropout, backend, base, device, dtype,
                 activation=None):
        super().__init__()
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
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
        return self._adapted(x)

    def _adapted(self, x, row_scale=None):
        A, B, core, kernel = self._factors()
        return structured_delta_linear(
            x, self.weight_out_in(), self.bias, A, B, core, kernel,
            scaling=self.scaling, dropout=self.dropout if self.training else 0.0, backend=self.backend,
            order=self.order, row_scale=row_scale, activation=self.activation,
        )

    def delta_weight(self) -> torch.Tensor:
        """ΔW (``out × in``) built densely; for merging and inspection, never used in forward."""
        if self.activation is not None:
            raise ValueError(f"activation={self.activation!r} (MPC_n) makes the delta depend on the input: there is "
                             "no ΔW to build or merge")
        A, B, core, kernel = self._factors()
        return structured_delta_weight(A, B, core, kernel, self.out_features, self.in_features, self.scaling,
                                       self.order)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into ``weight`` in place; forward then costs exactly an ``nn.Linear``.
        Refused (``ValueError``) with an activation (MPC_n), whose delta depends on the input."""
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

    def factor_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by name (trained or frozen), as adapter files store them."""
        return {key: t for key in ("A", "B", "core", "kernel") if (t := getattr(self, key, None)) is not None}

    def extra_repr(self) -> str:
        layout = ", weight_is_in_by_out=True" if self.weight_is_in_by_out else ""
        if self.activation is not None:
            layout += f", activation={self.activation!r}"
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
                 *, init="zero", activation=None, backend="auto", device=None, dtype=None, _base=None):
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.rank = _positive_int("rank", rank)
        if init not in ("zero", "paper"):
            raise ValueError(f"init must be 'zero' or 'paper', got {init!r}")
        self.alpha = alpha
        self.init = init
        _warn_useless_sizes("DCFTLinear", in_features, out_features, rank, kernel_size)
        scaling = 1.0 if alpha is None else alpha / rank
        super().__init__(in_features, out_features, bias=bias, scaling=scaling, dropout=dropout,
                         backend=backend, base=_base, device=device, dtype=dtype, activation=activation)
        d = kernel_size
        kw = self._factor_kwargs()
        shape_a, shape_b = factor_shapes(in_features, out_features, rank, d)
        self.A = nn.Parameter(torch.empty(shape_a, **kw))
        self.B = nn.Parameter(torch.empty(shape_b, **kw))
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
                 *, rslora=False, activation=None, backend="auto", device=None, dtype=None, _base=None):
        self.rank = _positive_int("rank", rank)
        self.alpha = alpha
        self.rslora = bool(rslora)
        _warn_useless_sizes("LoRALinear", in_features, out_features, rank)
        scaling = alpha / math.sqrt(rank) if self.rslora else alpha / rank
        super().__init__(in_features, out_features, bias=bias, scaling=scaling, dropout=dropout,
                         backend=backend, base=_base, device=device, dtype=dtype, activation=activation)
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
                 *, activation=None, backend="auto", device=None, dtype=None, _base=None):
        self.rank = _positive_int("rank", rank)
        self.alpha = alpha
        _warn_useless_sizes("DeLoRALinear", in_features, out_features, rank)
        super().__init__(in_features, out_features, bias=bias, scaling=alpha / rank, dropout=dropout,
                         backend=backend, base=_base, device=device, dtype=dtype, activation=activation)
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
        # The frozen buffers follow the trained core's dtype: under FSDP2's mixed precision (or
        # module.to()) parameters are cast and buffers are not.
        dtype = self.core.dtype
        return self.A.to(dtype), self.B.to(dtype), self.core, None

    def _adapter_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}"


def kron_factors(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dim``, as PEFT's LoKr splits a dimension: ``(factor, dim/factor)`` when
    ``factor`` divides ``dim``; else ``m`` is the largest divisor of ``dim`` up to ``√dim`` and up to
    ``factor`` (no limit for -1)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0 and k <= limit)
    return m, dim // m


class LoKrLinear(AdaptedLinear):
    """``nn.Linear`` + LoKr delta ``ΔW = (alpha / rank) · K ⊗ (B·A)`` (PEFT's and LyCORIS's LoKr).

    The other Kronecker order from DCFT: the small ``K`` (PEFT's ``w1``, ``out_l × in_m``) sets the
    coarse blocks, each a scaled copy of ``B·A`` (PEFT's ``w2_a · w2_b``, ``out_k × in_n``); sizes
    from :func:`kron_factors` as PEFT's ``factorization`` gives them. Computed without building ΔW.

    Args, as PEFT's ``LoKrConfig`` for linear layers:
        rank, alpha: r and alpha (scaling = alpha / r).
        decompose_factor: the split of in/out features (-1: near the square root).
        decompose_both: K as ``kernel_a · kernel_b`` (rank r) when r < max(out_l, in_m) / 2.
        rank_dropout: in training, each row of ΔW is kept with probability ``1 - rank_dropout``
            (rescaled by the kept fraction with ``rank_dropout_scale``).
        module_dropout: in training, the whole adapter is skipped with this probability.
        activation: MPC_n between the A and B products (then the layer cannot be merged).

    As in PEFT, ``B·A`` is the full ``B`` (with ``A`` an identity buffer) when r ≥ max(out_k, in_n)/2.
    Init as PEFT: K = 0 (or ``kernel_a`` = 0), A and B Kaiming-uniform, so ΔW = 0 at step 0.
    """

    order = "lokr"

    def __init__(self, in_features, out_features, rank=8, alpha=8.0, bias=True, *, decompose_factor=-1,
                 decompose_both=False, rank_dropout=0.0, module_dropout=0.0, rank_dropout_scale=False,
                 activation=None, backend="auto", device=None, dtype=None, _base=None):
        self.rank = _positive_int("rank", rank)
        self.alpha = alpha
        for name, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.decompose_factor, self.decompose_both = int(decompose_factor), bool(decompose_both)
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        super().__init__(in_features, out_features, bias=bias, scaling=alpha / rank, dropout=0.0,
                         backend=backend, base=_base, device=device, dtype=dtype, activation=activation)
        in_m, in_n = kron_factors(self.in_features, self.decompose_factor)
        out_l, out_k = kron_factors(self.out_features, self.decompose_factor)
        kw = self._factor_kwargs()
        if self.decompose_both and rank < max(out_l, in_m) / 2:
            self.kernel_a = nn.Parameter(torch.empty(out_l, rank, **kw))
            self.kernel_b = nn.Parameter(torch.empty(rank, in_m, **kw))
        else:
            self.kernel = nn.Parameter(torch.empty(out_l, in_m, **kw))
        if rank < max(out_k, in_n) / 2:
            self.A = nn.Parameter(torch.empty(rank, in_n, **kw))
        else:  # full w2: B is it, A the identity (r_eff = in_n ≤ 2r)
            self.register_buffer("A", torch.eye(in_n, **kw), persistent=False)
        self.B = nn.Parameter(torch.empty(out_k, self.A.shape[0], **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """K (or kernel_a) zeros, the rest Kaiming-uniform, as PEFT; the frozen weight is untouched."""
        if hasattr(self, "kernel"):
            nn.init.zeros_(self.kernel)
        else:
            nn.init.zeros_(self.kernel_a)
            nn.init.kaiming_uniform_(self.kernel_b, a=math.sqrt(5))
        if isinstance(self.A, nn.Parameter):
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def _factors(self):
        kernel = self.kernel if hasattr(self, "kernel") else self.kernel_a @ self.kernel_b
        return self.A, self.B, None, kernel

    def factor_tensors(self):
        names = ("kernel",) if hasattr(self, "kernel") else ("kernel_a", "kernel_b")
        names += ("A", "B") if isinstance(self.A, nn.Parameter) else ("B",)
        return {name: getattr(self, name) for name in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skipped = self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout
        if self.merged or skipped:
            return F.linear(x, self.weight_out_in(), self.bias)
        row_scale = None
        if self.training and self.rank_dropout:
            row_scale = (torch.rand(self.out_features, device=x.device) > self.rank_dropout).to(x.dtype)
            if self.rank_dropout_scale:
                row_scale = row_scale / row_scale.mean().clamp_min(1e-12)
        return self._adapted(x, row_scale)

    def _adapter_repr(self):
        kernel = (self.kernel.shape if hasattr(self, "kernel") else (self.kernel_a.shape[0], self.kernel_b.shape[1]))
        return (f"rank={self.rank}, alpha={self.alpha:g}, kernel={tuple(kernel)}, "
                f"B·A={tuple(self.B.shape)}×{tuple(self.A.shape)}")
