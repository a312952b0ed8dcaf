"""AdamWPrune's fused masked step: the base optimizer's update with the pruning mask inside it.

``step(optimizer)``, for an AdamWPrune with ``fused`` on and masks set:

1. Masked weights a kernel can take (lib/kernels: float32 on the CPU, or a GPU) and
   that already have their Adam state are *held*: their gradients are set aside, so the
   base optimizer's own step skips them. Every other masked weight has its gradient
   masked the eager way (a separate pass) and steps with the base.
2. The base's step runs: unmasked tensors (biases, norms, embeddings), and for
   AdamWSPAM its global clock and moment resets.
3. Each held weight takes the fused kernel with its group's hyperparameters and its own
   step count, which is advanced as the base would; the gradients are put back.

Bases: torch's AdamW (any implementation; not amsgrad, maximize, capturable or
differentiable) and AdamWSPAM's ``released`` form. Other settings take the eager
path for every tensor. Either way a pruned weight and its moments stay exactly +0.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lib.optim import bitmask, compact, kernels

_ADAMW_OFF = ("amsgrad", "maximize", "capturable", "differentiable")  # group flags the kernel does not implement


@torch.no_grad()
def step(optimizer: Any, closure: Callable[[], Any] | None = None) -> Any:
    """One step of AdamWPrune ``optimizer`` with its masks inside the update (module docstring)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    held = _hold(optimizer)
    try:
        optimizer.base.step()
    finally:
        for param, grad in held.items():
            param.grad = grad
    update = _spam_update(optimizer.base) if optimizer.base_name == "adamwspam" else _adamw_update
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    compacted = compact.compact_of(optimizer)
    layouts = compacted.layouts if compacted is not None else {}
    for param, grad in held.items():
        where = layouts.get(param)
        if not update(param, grad, optimizer.state[param], optimizer.masks[param], group_of[id(param)], where):
            raise RuntimeError(f"fused masked step refused a tensor it accepted ({tuple(param.shape)})")
    return loss


def fusable(optimizer: Any) -> bool:
    """True when ``optimizer``'s base and settings have a fused masked step (module docstring)."""
    base = optimizer.base
    if optimizer.base_name == "adamwspam":
        return getattr(base, "form", "") == "released"
    return isinstance(base, torch.optim.AdamW) and not any(
        group.get(flag) for group in base.param_groups for flag in _ADAMW_OFF)


def _hold(optimizer: Any) -> dict[Tensor, Tensor]:
    """Set aside the gradients of the masked weights the kernels take; mask the rest eagerly."""
    held: dict[Tensor, Tensor] = {}
    fused = fusable(optimizer)
    for param, packed in optimizer.masks.items():
        grad = param.grad
        if grad is None:
            continue
        state = optimizer.state.get(param, {})
        if fused and "exp_avg" in state and _kernel_takes(param, grad, state):
            held[param] = grad
            param.grad = None
        else:
            bitmask.apply_(grad, packed)
    return held


def kernel_takes(optimizer: Any, param: Tensor) -> bool:
    """True when ``optimizer``'s fused masked step has a kernel for ``param`` and its Adam state."""
    state = optimizer.state.get(param, {})
    return fusable(optimizer) and "exp_avg" in state and _kernel_takes(param, param, state)


def _kernel_takes(param: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
    tensors = (param, grad, state["exp_avg"], state["exp_avg_sq"])
    same = all(t.dtype == param.dtype and t.device == param.device and t.is_contiguous() for t in tensors)
    if not same or grad.is_sparse:
        return False
    if param.device.type == "cpu":
        return param.dtype == torch.float32 and not kernels.why_unavailable("cpu")
    return param.is_cuda and param.numel() % 8 == 0 and not kernels.why_unavailable("cuda")


def _adamw_update(param: Tensor, grad: Tensor, state: dict[str, Any], packed: Tensor, group: dict[str, Any],
                  where: compact.Layout | None) -> bool:
    """torch AdamW's update of one weight, its mask inside (the step count advanced as torch does); with ``where``
    the state is compact (lib/optim/compact.py) and only the kept entries are read and written."""
    state["step"] += 1
    t = float(state["step"])
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    scalars = {"decay": 1.0 - lr * group["weight_decay"], "beta1": beta1, "beta2": beta2,
               "step_size": lr / (1.0 - beta1**t), "bc2_sqrt": math.sqrt(1.0 - beta2**t), "eps": group["eps"]}
    tensors = (param.data, grad, state["exp_avg"], state["exp_avg_sq"], packed)
    if where is None:
        return kernels.masked_adamw_(*tensors, **scalars)
    return kernels.compact_adamw_(*tensors, where.offsets, where.kept, compact.CHUNK, **scalars)


def _spam_update(base: Any) -> Callable[..., bool]:
    """The released AdamWSPAM update for this step (its clock already advanced by the base's step)."""
    factor, clip = base.released_schedule(base.spam_step)

    def update(param: Tensor, grad: Tensor, state: dict[str, Any], packed: Tensor, group: dict[str, Any],
               where: compact.Layout | None) -> bool:
        state["step"] += 1
        s = state["step"]
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        scalars = {"clip": clip, "theta": base.theta, "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                   "step": -lr * math.sqrt(1.0 - beta2**s) / (1.0 - beta1**s) * factor,
                   "decay": 1.0 - lr * group["weight_decay"]}
        tensors = (param.data, grad, state["exp_avg"], state["exp_avg_sq"], packed)
        if where is None:
            return kernels.masked_spam_(*tensors, **scalars)
        return kernels.compact_spam_(*tensors, where.offsets, where.kept, compact.CHUNK, **scalars)

    return update
