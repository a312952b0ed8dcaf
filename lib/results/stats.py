"""Stated tests for comparing methods over seeds: what `make compare` and report.md print.

- Paired over the seeds both sides share: the mean of the per-seed differences with its 95 % t interval
  (n - 1 degrees of freedom). Seeds of one spec give the same data order and initialisation, so pairing
  removes that shared variation.
- Unpaired (no shared seed, both sides with two or more): Welch's t interval (Welch-Satterthwaite degrees
  of freedom).
- Otherwise: "no test possible", never a verdict.

A difference is significant when its 95 % interval excludes 0. The critical values are the two-sided 95 %
Student t quantiles (standard tables); between tabulated degrees of freedom the next lower one is used,
which widens the interval (conservative).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
RULE = ("Tests: paired over the seeds both sides share (mean of the per-seed differences, 95 % t interval); "
        "Welch's t interval when they share fewer than two; a difference is significant when its interval excludes 0; "
        "with one seed on a side, no test is possible.")


def t95(df: float) -> float:
    """The two-sided 95 % t critical value for ``df`` degrees of freedom (the next lower tabulated df)."""
    if df < 1:
        return math.inf
    if df > max(T95):
        return 1.960
    return T95[max(d for d in T95 if d <= df)]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one stated test of ``b - a``."""

    kind: str  # "paired", "welch" or "none"
    n: str  # the sample sizes, e.g. "3" (paired) or "2+3" (welch)
    delta: float | None = None
    low: float | None = None
    high: float | None = None
    why: str = ""

    @property
    def significant(self) -> bool | None:
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        if self.kind == "none":
            return f"no test possible ({self.why})"
        word = "significant" if self.significant else "not significant"
        name = "paired t" if self.kind == "paired" else "Welch t"
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}] ({name}, n={self.n}): {word}"


def compare_seeds(a: dict[int, float], b: dict[int, float]) -> Verdict:
    """The stated test of ``b - a``, each side a seed -> value map of its finished runs."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        diffs = [b[s] - a[s] for s in shared]
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        return Verdict("paired", str(len(diffs)), mean, mean - half, mean + half)
    if min(len(a), len(b)) < 2:
        why = "a side has no finished run" if min(len(a), len(b)) == 0 else "one seed on a side"
        return Verdict("none", f"{len(a)}+{len(b)}", why=why)
    return welch(list(a.values()), list(b.values()))


def welch(xs: list[float], ys: list[float]) -> Verdict:
    """Welch's t interval for mean(ys) - mean(xs); both need two or more values."""
    n1, n2 = len(xs), len(ys)
    v1, v2 = statistics.variance(xs) / n1, statistics.variance(ys) / n2
    delta = statistics.fmean(ys) - statistics.fmean(xs)
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Verdict("welch", f"{n1}+{n2}", delta, delta, delta)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    half = t95(df) * se
    return Verdict("welch", f"{n1}+{n2}", delta, delta - half, delta + half)
