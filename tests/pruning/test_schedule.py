"""Sparsity schedules: curve values, step resolution, update steps, validation."""

from __future__ import annotations

import pytest

from lib.core.errors import ConfigError
from lib.pruning.schedule import SparsitySchedule


def sched(
    kind: str = "cubic",
    target: float = 0.8,
    start: int | float = 100,
    end: int | float = 300,
    frequency: int = 10,
    initial: float = 0.0,
) -> SparsitySchedule:
    return SparsitySchedule(kind, target, start, end, frequency, initial)


@pytest.mark.parametrize("kind, middle", [("cubic", 0.875), ("linear", 0.5), ("cubic-late", 0.125)])
def test_values_at_key_steps(kind: str, middle: float) -> None:
    s = sched(kind)
    assert s.sparsity_at(0) == 0.0
    assert s.sparsity_at(99) == 0.0
    assert s.sparsity_at(100) == 0.0  # p = 0: initial sparsity
    assert s.sparsity_at(200) == pytest.approx(middle * 0.8)
    assert s.sparsity_at(300) == 0.8
    assert s.sparsity_at(10_000) == 0.8


def test_initial_sparsity_is_the_starting_point() -> None:
    s = sched("linear", target=0.9, initial=0.5)
    assert s.sparsity_at(100) == 0.5
    assert s.sparsity_at(200) == pytest.approx(0.7)


def test_cubic_prunes_fastest_early() -> None:
    # Guards against an inverted cubic (p**3 where 1 - (1 - p)**3 is meant).
    for step in (120, 150, 200, 250, 280):
        cubic, linear, late = (sched(k).sparsity_at(step) for k in ("cubic", "linear", "cubic-late"))
        assert cubic > linear > late


def test_monotone() -> None:
    for kind in ("cubic", "linear", "cubic-late"):
        s = sched(kind)
        values = [s.sparsity_at(t) for t in range(0, 400)]
        assert values == sorted(values)


def test_fractional_points_resolve_to_steps() -> None:
    s = sched(start=0.1, end=0.7).resolve(1000)
    assert (s.start, s.end) == (100, 700)
    assert s.steps() == (100, 700)
    mixed = sched(start=50, end=0.5).resolve(400)
    assert mixed.steps() == (50, 200)
    assert sched(start=0, end=1.0).resolve(123).steps() == (0, 123)


def test_unresolved_schedule_refuses_to_answer() -> None:
    with pytest.raises(RuntimeError, match="resolve"):
        sched(start=0.1, end=0.7).sparsity_at(5)


def test_update_steps_include_forced_final_update() -> None:
    s = sched(start=0, end=25, frequency=10)
    assert [t for t in range(0, 60) if s.should_update(t)] == [0, 10, 20, 25]


def test_update_steps_when_end_is_a_multiple() -> None:
    s = sched(start=5, end=30, frequency=5)
    assert [t for t in range(0, 60) if s.should_update(t)] == [5, 10, 15, 20, 25, 30]


def test_one_shot_schedule() -> None:
    s = sched(start=40, end=40)
    assert s.sparsity_at(39) == 0.0 and s.sparsity_at(40) == 0.8
    assert [t for t in range(100) if s.should_update(t)] == [40]


def test_reaches_target() -> None:
    assert sched(start=10, end=300).reaches_target(300)
    assert not sched(start=10, end=300).reaches_target(299)
    assert sched(start=0.1, end=1.0).reaches_target(57)


@pytest.mark.parametrize(
    "kwargs, symbol",
    [
        ({"kind": "quadratic"}, "PRUNING_SCHEDULE"),
        ({"start": 300, "end": 100}, "PRUNING_END"),
        ({"start": 0.7, "end": 0.1}, "PRUNING_START"),
        ({"target": 1.0}, "target"),
        ({"target": -0.1}, "target"),
        ({"frequency": 0}, "PRUNING_FREQUENCY"),
        ({"start": 1.5}, "PRUNING_START"),
        ({"end": -3}, "PRUNING_END"),
    ],
)
def test_bad_inputs_name_the_symbol(kwargs: dict, symbol: str) -> None:
    with pytest.raises(ConfigError, match=symbol) as info:
        sched(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ConfigError, match="cubic, cubic-late, linear"):
        sched("quadratic")


def test_mixed_points_out_of_order_fail_on_resolve() -> None:
    s = sched(start=500, end=0.5)  # cannot be checked before the run length is known
    with pytest.raises(ConfigError, match="PRUNING_END"):
        s.resolve(600)
