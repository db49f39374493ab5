"""Argument checks for the structured-delta op, run before any kernel launch."""
from __future__ import annotations

import torch


def factor_shapes(in_features: int, out_features: int, rank: int, d_out: int = 1,
                  d_in: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of A and B for a ``d_out × d_in`` kernel (square when ``d_in`` is None):
    ``A: (r, ⌈in/d_in⌉)``, ``B: (⌈out/d_out⌉, r)`` — the one place this rule is written."""
    d_in = d_out if d_in is None else d_in
    return (rank, -(-in_features // d_in)), (-(-out_features // d_out), rank)


def _shape(t):
    return tuple(t.shape)


ORDERS = ("dcft", "lokr")
ACTIVATIONS = ("tanh", "relu", "gelu")


def check_structured_delta_args(x, weight, bias, A, B, core, kernel, scaling, dropout, order="dcft",
                                row_scale=None, activation=None):
    """Raise ``TypeError``/``ValueError`` naming the bad argument; return nothing."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("x", x), ("weight", weight), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    out_features, in_features = weight.shape
    if in_features < 1 or out_features < 1:
        raise ValueError(f"weight must have in_features >= 1 and out_features >= 1, got shape {_shape(weight)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension in_features={in_features}, got shape {_shape(x)}")
    if bias is not None and _shape(bias) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {_shape(bias)}")

    d_out = d_in = 1
    if kernel is not None:
        if kernel.dim() != 2:
            raise ValueError(f"kernel must be a 2-D (d_out, d_in) matrix, got shape {_shape(kernel)}")
        d_out, d_in = kernel.shape
        if d_out < 1 or d_in < 1:
            raise ValueError(f"kernel must have both sizes >= 1, got shape {_shape(kernel)}")
    if A.dim() != 2 or A.shape[0] < 1:
        raise ValueError(f"A must be 2-D (rank >= 1, ⌈in/d⌉), got shape {_shape(A)}")
    rank = A.shape[0]
    (_, n_in), (n_out, _) = factor_shapes(in_features, out_features, rank, d_out, d_in)
    if _shape(A) != (rank, n_in):
        raise ValueError(f"A must have shape (rank, ⌈in_features/d⌉) = ({rank}, {n_in}), got {_shape(A)}")
    if _shape(B) != (n_out, rank):
        raise ValueError(f"B must have shape (⌈out_features/d⌉, rank) = ({n_out}, {rank}), got {_shape(B)}")
    if row_scale is not None and _shape(row_scale) != (out_features,):
        raise ValueError(f"row_scale must have shape ({out_features},), got {_shape(row_scale)}")
    if core is not None and _shape(core) != (rank, rank):
        raise ValueError(f"core must have shape (rank, rank) = ({rank}, {rank}), got {_shape(core)}")

    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("B", B), ("core", core), ("kernel", kernel),
                    ("row_scale", row_scale)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")
    if not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
