"""Statistics of whole structures gathered during training, for checkpoint-time surgery.
(docs/algorithms.md, "Structure statistics")

The analysis phase: while training, only measure. Every ``every``-th optimizer
step (CONFIG_STRUCTURE_STATS_EVERY) two running means are updated for every structure
the model family describes (lib/core/structures.py), and one for every residual block:

- gradient magnitude: mean |g| over the structure's weights, read from the gradients
  the step's backward already left (after unscaling, before clipping and the step);
- activation magnitude: mean |x| of what the structure feeds its consumer (the inputs
  of the matrix whose columns are the structure's ``dim=1`` part: a head's attention
  output, a neuron's GELU output, a channel's feature map), from one extra forward of
  the step's first micro-batch under no_grad, in eval mode (batch norms keep their
  running statistics, so training is exactly what it is without), with hooks on the
  consumers;
- a block's relative update ||block(x) - x|| / ||x||, from the same forward.

The forward stops as soon as the last hook has fired, so GPT-2's vocabulary projection
(most of a tiny GPT's forward) is never computed for statistics.

Between those steps nothing is hooked, so the cost there is exactly zero; the extra
forward keeps the statistics independent of torch.compile, DDP and activation
checkpointing (hooks inside the real forward would fire twice under recomputation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.structures import Structure, residual_blocks, structures


class _Enough(Exception):
    """Raised by the last hook to fire: the statistics forward stops there."""


class StructureStats:
    """Running sums of per-position gradient and activation magnitudes, and per-block updates."""

    def __init__(self, model: nn.Module, every: int) -> None:
        self.model, self.every = model, every
        self.units = structures(model)
        self.blocks = residual_blocks(model)
        params = dict(model.named_parameters())
        self.axes = sorted({(p.param, p.dim) for u in self.units for p in u.parts})  # gradient reductions
        self.consumers = sorted({p.param for u in self.units for p in u.parts if p.dim == 1})
        self.modules = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in self.consumers}
        self.grad = {key: torch.zeros(params[key[0]].shape[key[1]]) for key in self.axes}
        self.act = {name: torch.zeros(params[name].shape[1]) for name in self.consumers}
        self.update = torch.zeros(len(self.blocks))
        self.count = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def record(self, forward: Callable[[], Any]) -> None:
        """Add this step's gradients (already in ``.grad``) and one hooked ``forward()``'s activations."""
        params = dict(self.model.named_parameters())
        for name, dim in self.axes:
            grad = params[name].grad
            if grad is not None:
                others = [d for d in range(grad.dim()) if d != dim]
                self.grad[(name, dim)] += grad.abs().float().mean(dim=others).cpu()
        self.waiting = set(self.consumers) | {block.name for block in self.blocks}
        handles = [self.modules[name].register_forward_pre_hook(self._activation_hook(name))
                   for name in self.consumers]
        handles += [block.module.register_forward_hook(self._block_hook(i)) for i, block in enumerate(self.blocks)]
        training = self.model.training
        self.model.eval()  # batch norm must not update its running statistics: training stays unchanged
        try:
            forward()
        except _Enough:
            pass  # every hook has fired: the rest of the forward (GPT-2's vocabulary logits) is not needed
        finally:
            self.model.train(training)
            for handle in handles:
                handle.remove()
        self.count += 1

    def _activation_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().abs().float()
            channel = 1 if x.dim() == 4 else x.dim() - 1  # conv inputs are (N, C, H, W); linear (..., C)
            self.act[name] += x.mean(dim=[d for d in range(x.dim()) if d != channel]).cpu()
            self._fired(name)
        return hook

    def _fired(self, name: str) -> None:
        self.waiting.discard(name)
        if not self.waiting:
            raise _Enough

    def _block_hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0].detach().float()
            self.update[i] += float((out.detach().float() - x).norm() / x.norm().clamp_min(1e-12))
            self._fired(self.blocks[i].name)
        return hook

    # -- what surgery reads ----------------------------------------------------------------------

    def score(self, unit: Structure) -> float:
        """Mean |activation| x mean |gradient| of ``unit`` (a first-order estimate of what removing it
        changes); 0 for a unit whose weights never had a gradient."""
        grads, size, acts, width = 0.0, 0, 0.0, 0
        for part in unit.parts:
            index = list(part.index)
            grads += float(self.grad[(part.param, part.dim)][index].sum())
            size += len(index)
            if part.dim == 1:
                acts += float(self.act[part.param][index].sum())
                width += len(index)
        count = max(1, self.count)
        return (acts / max(1, width) / count) * (grads / max(1, size) / count)

    def block_score(self, name: str) -> float:
        """Mean relative update of residual block ``name``: how much the block changes its input."""
        i = [b.name for b in self.blocks].index(name)
        return float(self.update[i]) / max(1, self.count)

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "count": self.count, "update": self.update.clone(),
                "grad": {f"{n}:{d}": t.clone() for (n, d), t in self.grad.items()},
                "act": {n: t.clone() for n, t in self.act.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; ValueError when it describes another shape of model."""
        grads = {}
        for key, value in state["grad"].items():
            name, dim = key.rsplit(":", 1)
            grads[(name, int(dim))] = value
        shapes = {k: v.shape for k, v in self.grad.items()}, {n: v.shape for n, v in self.act.items()}
        if ({k: v.shape for k, v in grads.items()}, {n: v.shape for n, v in state["act"].items()}) != shapes \
                or state["update"].shape != self.update.shape:
            raise ValueError("the structure statistics describe another shape of model")
        self.grad = {k: v.clone() for k, v in grads.items()}
        self.act = {n: v.clone() for n, v in state["act"].items()}
        self.update = state["update"].clone()
        self.count = int(state["count"])
