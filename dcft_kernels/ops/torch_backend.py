"""The plan's three primitives in plain PyTorch (einsum); runs on any device.

Never builds ΔW: the adapter costs ``r·(in + out) + r·d_in·d_out`` multiply-adds a token. Viewing
a tensor as blocks zero-pads a copy when the width is not a multiple of d, which the fused
Triton and C++ backends avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dropout import dropout_mask


def round_once(x: torch.Tensor) -> bool:
    return True


def _blocks(t: torch.Tensor, n_blocks: int, d: int) -> torch.Tensor:
    """View a (tokens, features) tensor as (tokens, n_blocks, d), zero-padding the tail."""
    pad = n_blocks * d - t.shape[1]
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(t.shape[0], n_blocks, d)


def _dropped(v, p, seed):
    if p == 0.0:
        return v
    return v * dropout_mask(v.shape, p, seed, device=v.device, dtype=v.dtype)


def _acc(dtype):
    """Accumulation dtype of the small tensors: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def shrink(v, M, d, scale, p, seed):
    T = torch.einsum("ir,nid->nrd", M, _blocks(_dropped(v, p, seed), M.shape[0], d)).to(_acc(v.dtype))
    return T * scale if scale != 1.0 else T


def expand_(out, U, M, scale, p, seed):
    N, width = out.shape
    delta = torch.einsum("ir,nrd->nid", M.to(U.dtype), U).reshape(N, M.shape[0] * U.shape[2])[:, :width]
    out.add_(_dropped(delta, p, seed).to(out.dtype), alpha=scale)


def reduce(v, U, blocks, p, seed):
    return torch.einsum("nid,nrd->ir", _blocks(_dropped(v, p, seed), blocks, U.shape[2]).to(U.dtype), U)
