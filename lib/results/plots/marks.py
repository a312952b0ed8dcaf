"""What the graphs add so that no series hides and no number reads as more than it is.

Pure helpers (no drawing) for the graphs of lib/results/plots/:
one marker per method, a shade of the method's colour per target sparsity, a small
sideways dodge per method, the groups of points that coincide (and how to name a group
of runs in a note), the test set's resolution (one test image, in points of accuracy)
and the seed-spread note.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from matplotlib.colors import to_rgb

from lib.results import Metric, Run, tested_values

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
SPARSITY_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X", "h", "p")  # dense first
DODGE_SHARE = 0.4  # all methods' dodges together take this share of the smallest gap between x ticks
# the least sparse runs of a method are mixed this much with white, the sparsest this much with black: far
# enough apart to tell three or four sparsities apart, near enough that the method's colour stays recognisable
SHADE_LIGHT, SHADE_DARK = 0.55, 0.45
SAME = 9  # digits: values equal after rounding to this many decimals coincide on the page
MAX_INFERRED = 100_000  # a test-set size larger than this is not inferred from the values


def method_markers(methods: Sequence[str]) -> dict[str, str]:
    """One marker per method (sorted), cycling when there are more methods than markers."""
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(sorted(set(methods)))}


def sparsity_markers(targets: Sequence[float]) -> dict[float, str]:
    """One marker per target sparsity (sorted), the dense 0 % first."""
    return {t: SPARSITY_MARKERS[i % len(SPARSITY_MARKERS)] for i, t in enumerate(sorted(set(targets)))}


def sparsity_shades(groups: Iterable[tuple[str, float]],
                    colors: Mapping[str, Any]) -> dict[tuple[str, float], tuple[float, float, float]]:
    """A colour per (method, target sparsity): the method's colour, lighter for lower and darker for higher
    targets, so that one method's runs at different sparsities are told apart. Every method uses the same
    shade for the same target; dense runs (0 %) keep the plain colour, as does everything when the runs have
    a single nonzero target."""
    pairs = set(groups)
    levels = sorted({t for _, t in pairs if t > 0})
    shades = {}
    for method, target in pairs:
        rgb = to_rgb(colors.get(method) or "gray")
        if target > 0 and len(levels) > 1:
            amount = -SHADE_LIGHT + (SHADE_LIGHT + SHADE_DARK) * levels.index(target) / (len(levels) - 1)
            rgb = _mix(rgb, (1.0, 1.0, 1.0) if amount < 0 else (0.0, 0.0, 0.0), abs(amount))
        shades[(method, target)] = rgb
    return shades


def _mix(rgb: tuple[float, float, float], other: tuple[float, float, float],
         amount: float) -> tuple[float, float, float]:
    r, g, b = ((1 - amount) * c + amount * o for c, o in zip(rgb, other, strict=True))
    return (r, g, b)


def sparsity_text(target: float) -> str:
    """0.5 -> '50 %'; how a target sparsity is named in legends, titles and notes."""
    return f"{target * 100:g} %"


def runs_text(runs: Sequence[Run], seeds: Sequence[str]) -> str:
    """A set of runs named compactly for a note: 'adamw/magnitude at 50, 70 %; sgd/none at 0 % (seeds 1, 2
    each)'. Each method and target is named once; of the model's ``seeds``, those of the runs are named once
    when every (method, target) has the same ones, else after each target, and not at all when the model has
    one seed."""
    named: dict[str, dict[float, list[str]]] = {}
    for run in runs:
        named.setdefault(run.method, {}).setdefault(run.target, []).append(str(run.seed))
    seed_sets = {tuple(sorted(s)) for by_target in named.values() for s in by_target.values()}
    shared = next(iter(seed_sets)) if len(seed_sets) == 1 else None  # the seeds of every (method, target)
    parts = []
    for method, by_target in sorted(named.items()):
        if shared is None:  # the seeds differ: named after each target
            targets = ", ".join(f"{sparsity_text(t)} ({_seeds_text(s)})" for t, s in sorted(by_target.items()))
        else:
            targets = f"{', '.join(f'{t * 100:g}' for t in sorted(by_target))} %"
        parts.append(f"{method} at {targets}")
    text = "; ".join(parts)
    if shared is None or len(set(seeds)) < 2:
        return text
    return f"{text} ({_seeds_text(shared)}{' each' if len(runs) > len(shared) else ''})"


def _seeds_text(seeds: Sequence[str]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(sorted(seeds, key=lambda s: (len(s), s)))


def dodges(methods: Sequence[str], ticks: Sequence[float]) -> dict[str, float]:
    """A horizontal offset per method (in x units), centred on 0, so coincident points sit side by side."""
    names = sorted(set(methods))
    xs = sorted(set(ticks))
    gaps = [b - a for a, b in zip(xs, xs[1:], strict=False) if b > a]
    width = (min(gaps) if gaps else 10.0) * DODGE_SHARE
    step = width / max(1, len(names))
    return {m: (i - (len(names) - 1) / 2) * step for i, m in enumerate(names)}


def coincident(points: Sequence[tuple[str, Hashable]]) -> list[list[str]]:
    """Groups (two or more) of labels whose keys are equal: [(label, key), ...] -> [[label, ...], ...]."""
    by_key: dict[Hashable, list[str]] = {}
    for label, key in points:
        by_key.setdefault(_rounded(key), []).append(label)
    return [labels for labels in by_key.values() if len(labels) > 1]


def _rounded(key: Hashable) -> Hashable:
    if isinstance(key, float):
        return round(key, SAME)
    if isinstance(key, tuple):
        return tuple(_rounded(k) for k in key)
    return key


def is_perplexity(metric: Metric | None) -> bool:
    """Perplexity spans decades early in training: its axes are logarithmic."""
    return metric is not None and metric.name.lower() == "perplexity"


@dataclass(frozen=True)
class Resolution:
    """The test set's resolution: ``step`` points of accuracy per test example, ``count`` examples."""

    count: int
    inferred: bool  # True: derived from the recorded values, since no run records its test-set size

    @property
    def step(self) -> float:
        return 100.0 / self.count

    def stderr(self, accuracy: float) -> float:
        """Binomial standard error (points) of one accuracy measured on ``count`` examples."""
        p = min(max(accuracy / 100.0, 0.0), 1.0)
        return 100.0 * math.sqrt(p * (1 - p) / self.count)

    def text(self, accuracy: float | None = None) -> str:
        """One line for the graph; with ``accuracy``, the binomial standard error at that accuracy too."""
        if self.inferred:
            line = (f"accuracies are whole multiples of {self.step:.2g} points: the test set has {self.count} "
                    "examples or a multiple of that (inferred from the values; the runs do not record its size)")
        else:
            line = f"1 test example = {self.step:.2g} points of accuracy ({self.count} test examples)"
        if accuracy is not None:
            bound = "\u2264 " if self.inferred else ""  # a larger true test set only lowers it
            line += (f"; binomial standard error of one test accuracy near {accuracy:.3g}%: "
                     f"{bound}{self.stderr(accuracy):.2g} points")
        return line


def resolution_of(runs: Sequence[Run], metric: Metric | None) -> Resolution | None:
    """The test set's resolution of an accuracy (%) metric: recorded, else inferred, else None."""
    if metric is None or metric.unit != "%" or not metric.higher_is_better:
        return None
    recorded = {n for r in runs if isinstance(n := (r.summary.get("test_at_best") or {}).get("samples"), int)
                and n > 0}
    if len(recorded) == 1:
        return Resolution(recorded.pop(), inferred=False)
    count = infer_count(tested_values(runs))
    return Resolution(count, inferred=True) if count else None


def infer_count(accuracies: Sequence[float]) -> int | None:
    """The smallest test-set size N for which every accuracy (%) is a whole number of examples out of N.

    Each value is 100 * correct / N; the least common multiple of the reduced fractions'
    denominators divides the true N, so the step it gives is never finer than the truth.
    None when a value is not such a fraction, or with fewer than two distinct values.
    """
    if len(set(accuracies)) < 2:
        return None
    count = 1
    for value in accuracies:
        fraction = Fraction(value / 100.0).limit_denominator(MAX_INFERRED)
        if abs(float(fraction) * 100.0 - value) > 1e-7:
            return None
        count = math.lcm(count, fraction.denominator)
        if count > MAX_INFERRED:
            return None
    return count if count > 1 else None


def spread_note(seeds: int) -> str | None:
    """What the reader must know about the spread: None when there are two or more seeds."""
    if seeds >= 2:
        return None
    return "one seed per point: no spread available (no error bars); differences may be noise"
