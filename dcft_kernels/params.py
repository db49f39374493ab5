"""Trainable-parameter counts of the adapters for given weight shapes.

Shapes are ``(out_features, in_features)`` as in ``nn.Linear``.
"""
from __future__ import annotations

from .validation import factor_shapes


def adapter_parameters(out_features: int, in_features: int, method: str = "dcft", kernel_size: int = 8,
                       rank: int = 1) -> int:
    """Trainable parameters of one adapted layer.

    DCFT: ``r·(⌈out/d⌉ + ⌈in/d⌉) + d²``; LoRA: ``r·(out + in)``; DeLoRA: ``r²``.
    """
    if method == "dcft":
        (_, n_in), (n_out, _) = factor_shapes(in_features, out_features, rank, kernel_size)
        return rank * (n_out + n_in) + kernel_size**2
    if method == "lora":
        return rank * (out_features + in_features)
    if method == "delora":
        return rank * rank
    raise ValueError(f"method must be 'dcft', 'lora' or 'delora', got {method!r}")


def count_adapter_parameters(shapes, method: str = "dcft", kernel_size: int = 8, rank: int = 1) -> int:
    """Sum of ``adapter_parameters`` over an iterable of ``(out, in)`` weight shapes."""
    return sum(adapter_parameters(o, i, method, kernel_size, rank) for o, i in shapes)


def transformer_shapes(layers: int, hidden: int, ffn: int, gated: bool = False):
    """Weight shapes of Q, K, V, O, FFN-in and FFN-out in every layer (plus the gate if ``gated``)."""
    per_layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]
    if gated:
        per_layer.append((ffn, hidden))
    return per_layer * layers


# Models the DCFT paper reports on, and LLaMA-7B (gated FFN) for scale.
MODEL_SHAPES = {
    "deberta-v3-base": transformer_shapes(12, 768, 3072),
    "roberta-large": transformer_shapes(24, 1024, 4096),
    "llama-7b": transformer_shapes(32, 4096, 11008, gated=True),
}

# DCFT paper, Tables 1 and 4 (DeBERTaV3-base, all of Q, K, V, O, FFN-in, FFN-out, r = 1).
# Our full count of A, B and kernel comes out 3-5% above these; the paper does not say what
# it leaves out (the counts fit neither "without kernel" nor "without some layers").
PAPER_DEBERTA_V3_BASE = {2: 0.079e6, 4: 0.041e6, 6: 0.029e6, 8: 0.024e6, 12: 0.023e6}
