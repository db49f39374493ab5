"""What the rest of the package needs to know about ``torch.distributed``.

FSDP2 (``fully_shard``) keeps each parameter as a DTensor shard outside the module's forward; code
that reads parameters there (saving, regularisers) works on the whole tensor via ``full``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole. A DTensor is all-gathered (a collective: every rank must call), differentiably:
    the gradient of the whole tensor flows back to this rank's shard."""
    if dist.is_available():
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch < 2.5 kept it private
            from torch.distributed._tensor import DTensor
        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def writes_files() -> bool:
    """Whether this process writes files: the only one, or rank 0 of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
