"""``magnitude``: prune the weights of lowest importance (global threshold).

The importance is ``|w|`` by default, or another metric of
``lib/pruning/importance.py`` chosen by ``PruneSettings.importance``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.spec import PruneSettings
from lib.pruning.base import Pruner
from lib.pruning.importance import build_importance


class MagnitudePruner(Pruner):
    """Importance from ``settings.importance`` (``|w|`` by default)."""

    name = "magnitude"
    pack_masks = True  # 1 bit per weight: (weights + AdamW state + masks) / weights = 3.03, not 3.25

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings):
        super().__init__(model, optimizer, settings)
        self.metric = build_importance(settings.importance, model, self.params)

    def importance(self, name: str, param: nn.Parameter) -> Tensor:
        return self.metric.score(name, param)

    def importance_at(self, name: str, param: nn.Parameter, index: Tensor) -> Tensor:
        return self.metric.score_at(name, param, index)

    def weight_is_score(self) -> bool:
        return self.metric.name == "magnitude"

    def compares_rows(self) -> bool:
        return self.metric.per_row

    @torch.no_grad()
    def before_step(self) -> None:
        self.metric.accumulate()  # on the true gradient, before pruned entries are zeroed
        super().before_step()

    def prune_to(self, sparsity: float) -> None:
        self.metric.sync()
        super().prune_to(sparsity)

    def _buffers(self) -> Iterable[Tensor]:
        return [*super()._buffers(), *self.metric.buffers()]

    def close(self) -> None:
        self.metric.close()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "importance": self.metric.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.metric.load_state_dict(state.get("importance", {}))
