"""What the graphs add so that no series hides and no number reads as more than it is.

Pure helpers (no drawing) for lib/plots.py and lib/plots_memory.py: one marker per
method, a small sideways dodge per method, the groups of points that coincide, the
test set's resolution (one test image, in points of accuracy) and the seed-spread note.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from lib.results import Metric, Run

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
SPARSITY_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X", "h", "p")  # dense first
DODGE_SHARE = 0.4  # all methods' dodges together take this share of the smallest gap between x ticks
SAME = 9  # digits: values equal after rounding to this many decimals coincide on the page
MAX_INFERRED = 100_000  # a test-set size larger than this is not inferred from the values


def method_markers(methods: Sequence[str]) -> dict[str, str]:
    """One marker per method (sorted), cycling when there are more methods than markers."""
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(sorted(set(methods)))}


def sparsity_markers(targets: Sequence[float]) -> dict[float, str]:
    """One marker per target sparsity (sorted), the dense 0 % first."""
    return {t: SPARSITY_MARKERS[i % len(SPARSITY_MARKERS)] for i, t in enumerate(sorted(set(targets)))}


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
    count = infer_count([v for r in runs if r.status == "ok" and (v := r.test_value()) is not None])
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
