"""Sparsity schedules: how sparse the model should be at each optimizer step.

Between ``start`` and ``end`` the sparsity rises from ``initial`` to ``target``
along a curve of the progress ``p = (step - start) / (end - start)``:

- ``cubic`` (default, Zhu and Gupta 2017): ``1 - (1 - p)**3``, prunes fast
  early, when the network can still recover, and slowly late.
- ``linear``: ``p``.
- ``cubic-late``: ``p**3``, what the public AdamWPrune code does (slow early).

``start`` and ``end`` are step counts (int) or fractions of the run (float in
[0, 1]); ``resolve(total_steps)`` turns fractions into steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lib.core.errors import ConfigError

# Curve of the progress p in [0, 1] -> fraction of the way from initial to target.
CURVES: dict[str, Callable[[float], float]] = {
    "cubic": lambda p: 1.0 - (1.0 - p) ** 3,
    "linear": lambda p: p,
    "cubic-late": lambda p: p**3,
}


def _check_point(symbol: str, value: int | float) -> None:
    """A schedule point is a step count (int >= 0) or a fraction of the run (float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"{symbol}={value!r} must be a step count (integer) or a fraction of the run (0.0-1.0)"
        )
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{symbol}={value} is negative; give a step count >= 0")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{symbol}={value} is a float outside [0, 1]; give a fraction of the run or an integer step count"
        )


def _to_step(value: int | float, total_steps: int) -> int:
    """Step count of a schedule point: ints are steps already, floats are fractions of the run."""
    return value if isinstance(value, int) else round(value * total_steps)


@dataclass(frozen=True)
class SparsitySchedule:
    """The sparsity wanted at each step, and the steps on which masks are recomputed."""

    kind: str
    target: float
    start: int | float
    end: int | float
    frequency: int
    initial: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in CURVES:
            raise ConfigError(
                f"PRUNING_SCHEDULE='{self.kind}' is unknown; valid: {', '.join(sorted(CURVES))}"
            )
        if not 0.0 <= self.target < 1.0:
            raise ConfigError(f"target sparsity {self.target} must be in [0, 1)")
        if not 0.0 <= self.initial <= self.target:
            raise ConfigError(f"initial sparsity {self.initial} must be in [0, target={self.target}]")
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency < 1:
            raise ConfigError(
                f"PRUNING_FREQUENCY={self.frequency!r} must be an integer >= 1 (steps between updates)"
            )
        _check_point("PRUNING_START", self.start)
        _check_point("PRUNING_END", self.end)
        # Two points of the same kind can be compared now; mixed ones only once resolved.
        if type(self.start) is type(self.end):
            self._check_order()

    def _check_order(self) -> None:
        if self.end < self.start:
            raise ConfigError(
                f"PRUNING_END={self.end} is before PRUNING_START={self.start}; end must be >= start"
            )

    @property
    def resolved(self) -> bool:
        """True when start and end are both step counts."""
        return isinstance(self.start, int) and isinstance(self.end, int)

    def resolve(self, total_steps: int) -> SparsitySchedule:
        """This schedule with fractional start/end turned into step counts of a ``total_steps`` run."""
        resolved = dataclasses.replace(
            self, start=_to_step(self.start, total_steps), end=_to_step(self.end, total_steps)
        )
        resolved._check_order()
        return resolved

    def steps(self) -> tuple[int, int]:
        """``(start, end)`` as step counts; the schedule must be resolved."""
        if not self.resolved:
            raise RuntimeError("schedule has fractional start/end; call resolve(total_steps) first")
        return int(self.start), int(self.end)

    def sparsity_at(self, step: int) -> float:
        """Wanted sparsity after ``step`` optimizer steps."""
        start, end = self.steps()
        if step >= end:  # checked first so that end == start (one-shot pruning) never divides by zero
            return self.target
        if step < start:
            return 0.0
        progress = (step - start) / (end - start)
        return self.initial + (self.target - self.initial) * CURVES[self.kind](progress)

    def should_update(self, step: int) -> bool:
        """True on the steps where masks are recomputed: start, every ``frequency`` steps, and end.

        ``end`` is always an update even when ``end - start`` is not a multiple
        of ``frequency``, so the final target is applied exactly once.
        """
        start, end = self.steps()
        if step < start or step > end:
            return False
        return step == end or (step - start) % self.frequency == 0

    def reaches_target(self, total_steps: int) -> bool:
        """False when a ``total_steps`` run stops before the schedule's end (target never applied)."""
        return self.resolve(total_steps).steps()[1] <= total_steps
