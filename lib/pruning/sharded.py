"""Pruning on sharded weights (FSDP2, lib/train/sharding.py): each rank scores and masks its own shard.

FSDP2 shards every weight on dim 0 in contiguous pieces, rank 0's first, so a tensor's flattened order is its
shards' flattened orders one rank after another. The exact global threshold is then found without gathering
any score: the ``k``-th smallest score over every rank is selected byte by byte (four rounds of a 256-bin
histogram of the scores' order-preserving integer keys, summed over ranks), and the ties at it are shared out
in tensor, rank, index order, the order ``threshold.global_exact_mask`` breaks them in one process. The masks are
therefore the whole-model masks, cut into shards (tests/train/test_fsdp.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lib.core.shards import is_sharded, local  # noqa: F401 (re-exported for the pruners)
from lib.pruning.threshold import prune_count

BITS = 8  # one byte of the 32-bit key per round


def _all_reduce(values: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def _all_gather(values: Tensor) -> list[Tensor]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [values]
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values)
    return out


def zero_count(shards: Sequence[Tensor]) -> int:
    """Exactly-zero entries of the whole tensors whose local shards are ``shards``, summed over ranks."""
    counts = torch.tensor([sum(int((s == 0).sum()) for s in shards)], dtype=torch.int64)
    return int(_all_reduce(counts)[0])


def _keys(scores: Tensor) -> Tensor:
    """int64 keys in [0, 2**32) that order like the float32 scores (-0.0 counted as +0.0)."""
    bits = (scores.detach().to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, (~bits) & 0xFFFFFFFF, bits | 0x80000000)


def _value(key: int) -> float:
    bits = key & 0x7FFFFFFF if key >= 0x80000000 else (~key) & 0xFFFFFFFF
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def kth_smallest(local_scores: Sequence[Tensor], k: int) -> float:
    """The ``k``-th smallest (1-based) of every rank's scores, exactly; a collective call (every rank, same k)."""
    keys = torch.cat([_keys(s).reshape(-1) for s in local_scores] or [torch.empty(0, dtype=torch.int64)])
    prefix, need = 0, k
    for shift in range(32 - BITS, -1, -BITS):
        above = keys >> (shift + BITS)
        inside = keys[above == (prefix >> (shift + BITS))] if shift < 32 - BITS else keys
        counts = _all_reduce(torch.bincount((inside >> shift) & 0xFF, minlength=256).to(torch.int64))
        cumulative = counts.cumsum(0)
        byte = int(torch.searchsorted(cumulative, torch.tensor([need])).item())
        need -= int(cumulative[byte - 1]) if byte else 0
        prefix |= byte << shift
    return _value(prefix)


def sharded_exact_mask(local_scores: Sequence[Tensor], sparsity: float, total: int) -> list[Tensor]:
    """This rank's keep-masks of the exact global threshold over ``total`` scores on every rank (module docstring)."""
    k = prune_count(total, sparsity)
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in local_scores]
    if k == total:
        return [torch.zeros_like(s, dtype=torch.bool) for s in local_scores]
    value = kth_smallest(local_scores, k)
    below = int(_all_reduce(torch.tensor([sum(int((s < value).sum()) for s in local_scores)]))[0])
    ties = torch.tensor([int((s == value).sum()) for s in local_scores], dtype=torch.int64)
    every = torch.stack(_all_gather(ties))  # [rank, tensor]
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    left = k - below  # ties to prune, tensor by tensor, rank by rank within a tensor
    masks = []
    for i, s in enumerate(local_scores):
        before = int(every[:, :i].sum()) + int(every[:rank, i].sum())
        mine = min(max(left - before, 0), int(every[rank, i]))
        prune = s < value
        if mine:
            tied = (s == value).reshape(-1)
            prune |= (tied & (tied.cumsum(0) <= mine)).reshape(s.shape)
        masks.append(~prune)
    return masks
