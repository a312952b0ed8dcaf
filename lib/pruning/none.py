"""``none``: no pruning. It still measures the zeros in the prunable weights."""

from __future__ import annotations

from lib.core.spec import PruneSettings
from lib.pruning.base import Pruner
from lib.pruning.schedule import SparsitySchedule


class NonePruner(Pruner):
    """Leaves the model and the optimizer untouched."""

    name = "none"

    def make_schedule(self, settings: PruneSettings) -> SparsitySchedule:
        # The schedule settings mean nothing without pruning, so they are not validated.
        return SparsitySchedule("linear", 0.0, 0, 0, 1)

    def before_step(self) -> None:
        pass

    def after_step(self, step: int) -> bool:
        self.step = step
        return False
