"""Thresholds: turn importance scores into keep-masks (True = keep).

``exact`` is one global threshold over all prunable tensors that prunes
exactly ``k = round(sparsity * N)`` entries. Later: ``sampled`` (the k-th
value of a random sample, for very large models) and ``per_layer``. Each is a
function ``(scores, sparsity) -> masks`` registered in ``THRESHOLDS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lib.errors import ConfigError

ThresholdFn = Callable[[list[Tensor], float], list[Tensor]]


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` entries a ``sparsity`` prunes."""
    return min(total, max(0, round(sparsity * total)))


def _kth_smallest(scores: list[Tensor], k: int) -> float:
    """The k-th smallest score over all tensors (1-based), holding one concatenated copy."""
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    return flat.kthvalue(k).values.item()


def global_exact_mask(scores: list[Tensor], sparsity: float) -> list[Tensor]:
    """Keep-masks that prune exactly ``round(sparsity * N)`` lowest scores over all tensors.

    Scores equal to the threshold are pruned in order (tensor order, then
    flattened index) until the count is exact, so ties are broken
    deterministically and the reached sparsity never depends on them.
    """
    total = sum(s.numel() for s in scores)
    k = prune_count(total, sparsity)
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k == total:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    value = _kth_smallest(scores, k)
    # Entries strictly below the threshold are all pruned; the rest of k comes from the ties.
    ties_to_prune = k - sum(int((s < value).sum()) for s in scores)
    masks = []
    for s in scores:
        prune = s < value
        ties = s == value
        n_ties = int(ties.sum())
        if n_ties <= ties_to_prune:
            prune |= ties
            ties_to_prune -= n_ties
        elif ties_to_prune > 0:
            # Only the first ties_to_prune equal entries of this tensor (flattened order).
            first = ties.reshape(-1).cumsum(0) <= ties_to_prune
            prune |= (ties.reshape(-1) & first).reshape(s.shape)
            ties_to_prune = 0
        masks.append(~prune)
    return masks


THRESHOLDS: dict[str, ThresholdFn] = {
    "exact": global_exact_mask,
}


def get_threshold(name: str) -> ThresholdFn:
    """The threshold function ``name``; an unknown name lists the valid ones."""
    try:
        return THRESHOLDS[name]
    except KeyError:
        raise ConfigError(
            f"PRUNING_THRESHOLD='{name}' is unknown; valid: {', '.join(sorted(THRESHOLDS))}"
        ) from None
