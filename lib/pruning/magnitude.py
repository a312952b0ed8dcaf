"""``magnitude``: prune the weights of smallest absolute value (global threshold)."""

from __future__ import annotations

from torch import Tensor, nn

from lib.pruning.base import Pruner


class MagnitudePruner(Pruner):
    """Importance ``|w|``."""

    name = "magnitude"

    def importance(self, name: str, param: nn.Parameter) -> Tensor:
        return param.detach().abs()
