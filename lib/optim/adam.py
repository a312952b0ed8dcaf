"""``adam``: torch Adam; its weight decay is L2 (added to the gradient), as torch does it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lib.core.spec import OptimSettings
from lib.optim.groups import adam_kwargs


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """Adam over ``model``'s parameter groups; ``options`` go straight to torch (e.g. ``fused=True``)."""
    return torch.optim.Adam(
        **adam_kwargs(model, settings),
        **options,
    )
