"""Optimizer registry: one name -> factory dict and one factory function.

Adding an optimizer is a new module with a ``build(model, settings, **options)``
function plus one line in ``OPTIMIZERS``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.registry import lookup
from lib.core.spec import OptimSettings
from lib.optim import adam, adamw, adamwadv, adamwprune, adamwspam, sgd
from lib.optim.groups import param_groups

__all__ = ["OPTIMIZERS", "OptimizerFactory", "build_optimizer", "param_groups"]


class OptimizerFactory(Protocol):
    """Builds an optimizer for ``model``; ``options`` are passed to torch (``fused``, ``foreach``)."""

    def __call__(
        self, model: nn.Module, settings: OptimSettings, **options: Any
    ) -> torch.optim.Optimizer: ...


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": sgd.build,
    "adam": adam.build,
    "adamw": adamw.build,
    "adamwadv": adamwadv.build,
    "adamwspam": adamwspam.build,
    "adamwprune": adamwprune.build,
}


def build_optimizer(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``settings.name`` for ``model``.

    ``options`` (e.g. ``fused=True``) are handed to the torch constructor; by
    default torch picks its own foreach/fused implementation.
    """
    factory = lookup(OPTIMIZERS, settings.name, "optimizer", "lib/optim/__init__.py")
    try:
        return factory(model, settings, **options)
    except ValueError as exc:
        # torch validates lr, betas, eps and momentum with ValueError; make it one line naming the optimizer.
        raise ConfigError(f"optimizer '{settings.name}': {exc}") from None
