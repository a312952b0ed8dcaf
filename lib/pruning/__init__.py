"""Pruner registry: one name -> class dict and one factory function.

Adding a method is a new module with a ``Pruner`` subclass plus one line in
``PRUNERS``. Schedules (``schedule.py``) and thresholds (``threshold.py``)
have registries of their own.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.core.registry import lookup
from lib.core.spec import PruneSettings
from lib.pruning.base import Pruner
from lib.pruning.magnitude import MagnitudePruner
from lib.pruning.movement import MovementPruner
from lib.pruning.nm import NMPruner
from lib.pruning.none import NonePruner
from lib.pruning.prunable import prunable_parameters
from lib.pruning.schedule import SparsitySchedule
from lib.pruning.state import StatePruner
from lib.pruning.structured import LayerDropoutPruner, StructuredPruner

__all__ = ["PRUNERS", "WHOLE_STRUCTURES", "Pruner", "SparsitySchedule", "build_pruner", "prunable_parameters"]

PRUNERS: dict[str, type[Pruner]] = {
    "none": NonePruner,
    "magnitude": MagnitudePruner,
    "movement": MovementPruner,
    "state": StatePruner,
    "structured": StructuredPruner,
    "layer-dropout": LayerDropoutPruner,
    "nm": NMPruner,
}

WHOLE_STRUCTURES = tuple(name for name, cls in PRUNERS.items() if cls.whole_structures)  # structured, layer-dropout


def build_pruner(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings
) -> Pruner:
    """The pruner ``settings.method`` for ``model``, validating its schedule and threshold."""
    cls = lookup(PRUNERS, settings.method, "pruning method", "lib/pruning/__init__.py")
    return cls(model, optimizer, settings)
