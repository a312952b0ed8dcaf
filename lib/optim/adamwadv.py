"""``adamwadv``: AdamW with AMSGrad and its own gradient clipping at global norm 1.0.

The learning-rate schedule (warm-up + cosine) is the trainer's: it writes
``group["lr"]`` every step, so no scheduler lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lib.core.spec import OptimSettings
from lib.optim.groups import adam_kwargs

MAX_GRAD_NORM = 1.0


class AdamWAdv(torch.optim.AdamW):
    """``torch.optim.AdamW(amsgrad=True)`` that clips the global gradient norm of its parameters first.

    The clip runs as a step pre-hook, i.e. inside ``step()`` before the update,
    rather than in an overridden ``step``: torch wraps every optimizer class's
    ``step`` with its hook/profiler wrapper, so an override calling
    ``super().step()`` would run each registered hook twice. The update itself
    stays torch's (foreach or fused) AdamW.
    """

    def __init__(self, params: Iterable[Any], *, max_grad_norm: float = MAX_GRAD_NORM, **kwargs: Any) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0)")
        super().__init__(params, amsgrad=True, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.register_step_pre_hook(AdamWAdv._clip_before_step)

    def clip_gradients(self) -> torch.Tensor | None:
        """Scale the gradients of all groups so their joint norm is at most ``max_grad_norm``; the pre-clip norm."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    @staticmethod
    def _clip_before_step(
        optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        assert isinstance(optimizer, AdamWAdv)
        closure: Callable[[], Any] | None = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            optimizer.clip_gradients()
            return None
        # A closure recomputes the gradients, so evaluate it here, clip, and hand
        # torch a closure that just returns the loss already computed.
        with torch.enable_grad():
            loss = closure()
        optimizer.clip_gradients()
        return (args[0],), {"closure": lambda: loss}


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """AdamWAdv over ``model``'s parameter groups; ``options`` go straight to torch (e.g. ``fused=True``)."""
    return AdamWAdv(
        **adam_kwargs(model, settings),
        **options,
    )
