"""Collective helpers that degrade to no-ops in a single process (no process group).

Losses own their global statistics (DINOv2 style): they call these helpers, which only touch
`torch.distributed` when a process group is initialised, so the same code runs in one process,
under DDP, and in a 2-rank gloo test.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (in place, returned); identity without a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (same shape on every rank) over ranks along dim 0, keeping gradients.

    Uses `torch.distributed.nn.functional.all_gather`, whose backward sums each rank's gradient
    contributions back to the rank that owns the rows.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0
