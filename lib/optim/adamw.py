"""``adamw``: torch AdamW (decoupled weight decay, Loshchilov and Hutter 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lib.optim.groups import param_groups
from lib.spec import OptimSettings


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameter groups; ``options`` go straight to torch (e.g. ``fused=True``)."""
    return torch.optim.AdamW(
        param_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        **options,
    )
