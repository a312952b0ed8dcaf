"""Timings that say how far to trust them: median and interquartile range over repeats, and the load.

Every timing the sweep and surgery record goes through ``measure``: the candidates run interleaved (A, B,
A, B, ...) so drift hits both alike, each gets its median and interquartile range, and the machine's
1-minute load average is read beside them. A comparison is *unreliable*, and no recommendation may rest
on it, when a side's spread (IQR / median) is over ``MAX_SPREAD`` or the load average exceeds the cores
this process may use: a 2-core machine busy with other work gave sweep speed-ups from 0.04x to 10.9x.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

MAX_SPREAD = 0.25


@dataclass(frozen=True)
class Timing:
    """One candidate's time over its repeats (milliseconds, or the unit a benchmark's summary names)."""

    median_ms: float
    iqr_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0


def measure(fns: list[Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None) -> list[Timing]:
    """Each of ``fns`` run ``repeats`` times, interleaved, after one warm-up call each."""
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            out.append(1000 * (time.perf_counter() - start))
    return [Timing(statistics.median(t), _iqr(t), len(t)) for t in times]


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def load() -> dict[str, float]:
    """The 1-minute load average and the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"load_avg_1min": os.getloadavg()[0], "cores": cores}


def verdict(timings: list[Timing], machine: dict[str, float]) -> dict[str, object]:
    """{"reliable": bool, "why": text} for a comparison of ``timings`` measured under ``machine``."""
    why = []
    worst = max(timings, key=lambda t: t.spread)
    if worst.spread > MAX_SPREAD:
        why.append(f"spread {worst.spread:.0%} of the median (over {MAX_SPREAD:.0%})")
    if machine["load_avg_1min"] > machine["cores"]:
        why.append(f"load average {machine['load_avg_1min']:.1f} on {machine['cores']:g} core(s)")
    return {"reliable": not why, "why": "; ".join(why)}


def record(timings: list[Timing], machine: dict[str, float]) -> dict[str, object]:
    """What a row stores about its timings: each side's median and IQR, the load, and the verdict."""
    return {"sides": [asdict(t) for t in timings], **machine, **verdict(timings, machine)}


def summary(samples: dict[str, list[float]], unit: str = "s") -> dict[str, object]:
    """For a benchmark's raw repeats (side -> values in ``unit``): each side's median and IQR, the load now and
    the verdict, so a printed ratio can say whether it may be trusted."""
    sides = {name: Timing(statistics.median(v), _iqr(v), len(v)) for name, v in samples.items() if v}
    machine = load()
    return {"unit": unit, "sides": {name: {"median": t.median_ms, "iqr": t.iqr_ms, "repeats": t.repeats}
                                    for name, t in sides.items()}, **machine, **verdict(list(sides.values()), machine)}


def mark(check: dict[str, object] | None) -> str:
    """'' for a trustworthy timing, else ' (unreliable: why)' to print beside its figure."""
    return "" if not check or check.get("reliable", True) else f" (unreliable: {check.get('why')})"
