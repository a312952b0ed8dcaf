"""``adamw``: torch AdamW (decoupled weight decay, Loshchilov and Hutter 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lib.optim.groups import adam_kwargs
from lib.spec import OptimSettings


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameter groups; ``options`` go straight to torch (e.g. ``fused=True``)."""
    return torch.optim.AdamW(
        **adam_kwargs(model, settings),
        **options,
    )
