"""Per-layer sparsity distributions (CONFIG_SPARSITY_DISTRIBUTION): how an overall target is shared among layers.

- ``global``: no per-layer targets; one threshold over every layer (lib/pruning/threshold.py) decides.
- ``uniform``: every layer at the target.
- ``erk`` (Erdős–Rényi-Kernel, as in RigL): a layer's density is proportional to the sum of its dimensions
  over their product, ``eps * sum(shape) / prod(shape)``. ``eps`` is chosen so the kept weights add up to
  the target; a layer whose density would exceed 1 is kept dense and ``eps`` is found again for the rest,
  until none does.
- ``sweep``: from a sweep's per-layer sensitivity (`make sweep LAYERS=y`, lib/pruning/sensitivity.py): each
  layer's measured quality drop when pruned alone, a curve over sparsity. Every layer is pruned as far as its
  curve stays below a common level ``tau``, and ``tau`` is set so the total reaches the target: less sensitive
  layers are pruned harder ("equal drop"). Between the curve's points the drop is interpolated linearly (from
  0 at sparsity 0), a layer goes only as far as its drop stays below ``tau`` (a smaller drop measured further
  on, noise, is not reached before the larger one), and no layer goes past the highest sparsity it was
  measured at.
- ``owl`` (outlier-weighted layerwise sparsity, lib/pruning/owl.py): density ``1 - s + deviation`` per layer,
  the deviations from calibration text (weighted mean 0, so the total holds); where a density would leave
  [0, 1] every deviation is shrunk by one factor until none does.

Every distribution keeps exactly ``N - round(s * N)`` weights overall. Rounding: each layer keeps the whole
number of weights below its share, and the weights left over go one each to the largest layers that still
have room (by size, then layer order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lib.pruning.threshold import prune_count

DISTRIBUTIONS = ("global", "uniform", "erk", "sweep", "owl")
Curve = Sequence[Sequence[float]]  # ((sparsity, drop), ...), sparsity ascending


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


def reachable(shapes: Sequence[Sequence[int]], curves: Sequence[Curve]) -> float:
    """The highest overall sparsity ``sweep`` can give: every layer at the highest sparsity it was measured at."""
    sizes = [math.prod(shape) for shape in shapes]
    return sum(size * curve[-1][0] for size, curve in zip(sizes, curves, strict=True)) / sum(sizes)


def sweep_densities(shapes: Sequence[Sequence[int]], curves: Sequence[Curve], sparsity: float) -> list[float]:
    """Each layer's density under ``sweep`` (module docstring), before rounding to whole weights. ``sparsity``
    must not exceed ``reachable``; the level ``tau`` is bisected, and the two sides' sparsities mixed by the
    one fraction that makes the total exact (a flat stretch of a curve makes its sparsity jump at one level)."""
    sizes = [math.prod(shape) for shape in shapes]
    points = [_points(curve) for curve in curves]
    wanted = sparsity * sum(sizes)

    def pruned(tau: float) -> list[float]:
        return [_sparsity_at(curve, tau) for curve in points]

    def total(levels: list[float]) -> float:
        return sum(size * s for size, s in zip(sizes, levels, strict=True))

    high = max(drop for curve in points for _, drop in curve)
    if total(pruned(high)) < wanted - 1e-9 * sum(sizes):
        raise ValueError(f"sparsity {sparsity} is beyond the {reachable(shapes, curves)} the curves reach")
    if total(pruned(0.0)) >= wanted:  # layers that lose nothing already hold the target: share it among them
        below, above = [0.0] * len(sizes), pruned(0.0)
    else:  # total(pruned(low)) < wanted <= total(pruned(high)) throughout
        low = 0.0
        for _ in range(200):
            middle = (low + high) / 2
            if not low < middle < high:
                break
            low, high = (middle, high) if total(pruned(middle)) < wanted else (low, middle)
        below, above = pruned(low), pruned(high)
    gap = total(above) - total(below)
    share = min(1.0, max(0.0, (wanted - total(below)) / gap)) if gap > 0 else 1.0
    return [1.0 - (b + share * (a - b)) for b, a in zip(below, above, strict=True)]


def _points(curve: Curve) -> list[tuple[float, float]]:
    """``curve`` sorted by sparsity, from (0, 0)."""
    return [(0.0, 0.0), *sorted((float(s), float(d)) for s, d in curve)]


def _sparsity_at(curve: list[tuple[float, float]], tau: float) -> float:
    """How far along ``curve`` the drop stays at most ``tau``: the scan stops at the first point above it, so a
    smaller drop measured further on (noise) is never reached before the larger one."""
    reached = 0.0
    for (s0, d0), (s1, d1) in zip(curve, curve[1:], strict=False):
        if d1 <= tau:
            reached = s1
            continue
        if d0 <= tau < d1:
            reached = s0 + (s1 - s0) * (tau - d0) / (d1 - d0)
        break
    return reached


def owl_densities(deviations: Sequence[float], sparsity: float) -> list[float]:
    """``1 - sparsity + t * deviation`` per layer, with the largest ``t <= 1`` that keeps every density in [0, 1]."""
    base = 1.0 - sparsity
    t = 1.0
    for d in deviations:
        if d > 0:
            t = min(t, (1.0 - base) / d)
        elif d < 0:
            t = min(t, base / -d)
    return [min(1.0, max(0.0, base + t * d)) for d in deviations]


def kept_counts(kind: str, shapes: Sequence[Sequence[int]], sparsity: float,
                curves: Sequence[Curve] = (), deviations: Sequence[float] = ()) -> list[int]:
    """Whole weights each layer keeps under distribution ``kind`` (not ``global``), adding up to exactly
    ``N - round(sparsity * N)`` (module docstring); ``curves`` (one per layer) for ``sweep``, ``deviations``
    for ``owl``."""
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    wanted = total - prune_count(total, sparsity)
    if kind == "uniform":
        densities = [1.0 - sparsity] * len(sizes)
    elif kind == "erk":
        densities = erk_densities(shapes, sparsity)
    elif kind == "sweep":
        densities = sweep_densities(shapes, curves, sparsity)
    elif kind == "owl":
        densities = owl_densities(deviations, sparsity)
    else:
        raise ValueError(f"distribution {kind!r} has no per-layer targets; valid: uniform, erk, sweep, owl")
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
