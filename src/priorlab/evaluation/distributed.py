"""Sharding evaluation work over DDP ranks and gathering it back in the original order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int) -> Tensor:
    """The indices of n items this rank handles (i ≡ rank mod world)."""
    rank, world = rank_world()
    return torch.arange(rank, n, world)


def gather(local: Tensor, n: int) -> Tensor:
    """Reassemble per-rank results of `shard(n)` into the full (n, ...) tensor on every rank (on CPU)."""
    rank, world = rank_world()
    local = local.detach().cpu()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        out[torch.arange(r, n, world)] = part
    return out
