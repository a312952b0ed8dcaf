"""``sgd``: torch SGD with momentum (Nesterov optional); weight decay is L2, as torch does it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings
from lib.optim.groups import param_groups


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """SGD over ``model``'s parameter groups; ``options`` go straight to torch (e.g. ``fused=True``)."""
    if settings.nesterov and settings.momentum <= 0:
        raise ConfigError("sgd: Nesterov momentum needs momentum > 0; set a momentum or turn Nesterov off")
    return torch.optim.SGD(
        param_groups(model, settings.weight_decay),
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
        **options,
    )
