"""Per-layer sparsity distributions (CONFIG_SPARSITY_DISTRIBUTION): how an overall target is shared among layers.

- ``global``: no per-layer targets; one threshold over every layer (lib/pruning/threshold.py) decides.
- ``uniform``: every layer at the target.
- ``erk`` (Erdős–Rényi-Kernel, as in RigL): a layer's density is proportional to the sum of its dimensions
  over their product, ``eps * sum(shape) / prod(shape)``. ``eps`` is chosen so the kept weights add up to
  the target; a layer whose density would exceed 1 is kept dense and ``eps`` is found again for the rest,
  until none does.

Every distribution keeps exactly ``N - round(s * N)`` weights overall. Rounding: each layer keeps the whole
number of weights below its share, and the weights left over go one each to the largest layers that still
have room (by size, then layer order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lib.pruning.threshold import prune_count

DISTRIBUTIONS = ("global", "uniform", "erk")


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float) -> list[float]:
    """Each layer's ERK density (kept fraction) for the overall ``sparsity``, before rounding to whole weights."""
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes, strict=True)]
    keep = (1.0 - sparsity) * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(sizes)) if i not in dense]
        if not rest:
            return [1.0] * len(sizes)
        eps = (keep - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in rest)
        over = {i for i in rest if eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense |= over


def kept_counts(kind: str, shapes: Sequence[Sequence[int]], sparsity: float) -> list[int]:
    """Whole weights each layer keeps under distribution ``kind`` (not ``global``), adding up to exactly
    ``N - round(sparsity * N)`` (module docstring)."""
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    wanted = total - prune_count(total, sparsity)
    if kind == "uniform":
        densities = [1.0 - sparsity] * len(sizes)
    elif kind == "erk":
        densities = erk_densities(shapes, sparsity)
    else:
        raise ValueError(f"distribution {kind!r} has no per-layer targets; valid: uniform, erk")
    kept = [min(size, math.floor(d * size + 1e-9)) for d, size in zip(densities, sizes, strict=True)]
    left = wanted - sum(kept)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    while left > 0:
        for i in order:
            if left and kept[i] < sizes[i]:
                kept[i] += 1
                left -= 1
    while left < 0:  # shares rounded up past the total (a float's last bit): take back from the largest
        for i in order:
            if left and kept[i] > 0:
                kept[i] -= 1
                left += 1
    return kept
