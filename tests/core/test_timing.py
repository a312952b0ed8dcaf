"""lib/core/timing.py: every timing keeps its median, interquartile range and the load it was taken under."""

from __future__ import annotations

import os
import time

from lib.core import timing
from lib.core.timing import Timing


def test_measure_interleaves_and_keeps_median_and_iqr() -> None:
    order = []
    fast = timing.measure([lambda: order.append("a"), lambda: (order.append("b"), time.sleep(0.002))], repeats=5)
    assert order == ["a", "b"] * 6  # one warm-up each, then A, B, A, B, ...
    assert [t.repeats for t in fast] == [5, 5]
    assert fast[1].median_ms >= 2.0 > fast[0].median_ms and fast[1].iqr_ms >= 0


def test_a_wide_spread_or_a_loaded_machine_makes_a_comparison_unreliable() -> None:
    calm = {"load_avg_1min": 0.5, "cores": 2}
    steady, noisy = Timing(10.0, 1.0, 9), Timing(10.0, 4.0, 9)  # IQR 10 % and 40 % of the median
    assert timing.verdict([steady, steady], calm) == {"reliable": True, "why": ""}
    assert timing.verdict([steady, noisy], calm) == {"reliable": False,
                                                     "why": "spread 40% of the median (over 25%)"}
    busy = timing.verdict([steady, steady], {"load_avg_1min": 6.2, "cores": 2})
    assert busy == {"reliable": False, "why": "load average 6.2 on 2 core(s)"}
    record = timing.record([steady, noisy], calm)
    assert record["sides"][1] == {"median_ms": 10.0, "iqr_ms": 4.0, "repeats": 9} and record["cores"] == 2


def test_the_load_is_read_from_the_machine() -> None:
    before = os.getloadavg()[0]
    machine = timing.load()
    assert machine["cores"] == len(os.sched_getaffinity(0))
    assert abs(machine["load_avg_1min"] - before) < 0.5  # read now, not a constant
