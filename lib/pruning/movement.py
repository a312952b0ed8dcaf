"""``movement``: keep the weights that move away from zero (Sanh et al. 2020).

Two forms, chosen by ``PruneSettings.movement_form``:

- ``sanh`` (default, the paper): a score buffer ``S`` (float32, one per
  prunable weight) accumulates ``-w * g`` every step, in ``before_step``,
  on the true gradient before pruned entries are zeroed. ``S`` is the
  first-order estimate of how much the loss has dropped thanks to ``w``
  moving away from zero. Accumulation starts at step 1, not at pruning
  start: the paper sums over the whole fine-tuning run, and a buffer started
  at pruning start would rank the first mask update on a single step's
  gradient (or on all-zero scores). Pruned weights are zero, so their ``S``
  stays frozen until the next update may revive them.
- ``knlp`` (the public AdamWPrune code): ``w * (w - w0)``, where ``w0`` is a
  copy of the weights taken when pruning starts: at the beginning of the
  step on which the schedule starts (before that step's optimizer update),
  so the first mask update already sees one step of movement instead of
  ranking all-zero scores. No buffer before pruning starts.

Both are reported through ``_buffers`` (the memory benchmark counts them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.registry import lookup
from lib.core.spec import PruneSettings
from lib.pruning.base import Pruner

FORMS = {"sanh": "Sanh et al. 2020: S += -w * g every step", "knlp": "w * (w - w0), w0 at pruning start"}


class MovementPruner(Pruner):
    """Movement pruning; high score = keep."""

    name = "movement"
    pack_masks = True  # 1 bit per weight on top of the float32 score

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings):
        super().__init__(model, optimizer, settings)
        lookup(FORMS, settings.movement_form, "movement form (MOVEMENT_FORM)", "lib/pruning/movement.py")
        self.form = settings.movement_form
        self.scores: dict[str, Tensor] = {}  # sanh: accumulated -w * g
        self.w0: dict[str, Tensor] = {}  # knlp: weights when pruning started
        if self.form == "sanh":
            self.scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params}

    @torch.no_grad()
    def before_step(self) -> None:
        if self.form == "sanh":
            for name, param in self.params:
                if param.grad is not None:
                    self.scores[name].addcmul_(param.detach(), param.grad, value=-1.0)
        elif not self.w0 and self._pruning_starts_now():
            self.snapshot()
        super().before_step()

    def _pruning_starts_now(self) -> bool:
        """True when the step about to run (``self.step + 1``) is at or past the schedule's start."""
        return self.schedule.resolved and self.step + 1 >= self.schedule.steps()[0]

    @torch.no_grad()
    def snapshot(self) -> None:
        """knlp: take ``w0``, the weights movement is measured from."""
        self.w0 = {name: param.detach().clone() for name, param in self.params}

    def importance(self, name: str, param: nn.Parameter) -> Tensor:
        if self.form == "sanh":
            return self.scores[name]
        if not self.w0:  # prune_to called without before_step (no training step yet): no movement
            self.snapshot()
        w = param.detach()
        return w * (w - self.w0[name])

    def importance_at(self, name: str, param: nn.Parameter, index: Tensor) -> Tensor:
        if self.form == "sanh" or not self.w0:
            return super().importance_at(name, param, index)
        w = param.detach().reshape(-1)[index]
        return w * (w - self.w0[name].reshape(-1)[index])

    def _buffers(self) -> Iterable[Tensor]:
        return [*super()._buffers(), *self.scores.values(), *self.w0.values()]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "movement_scores": dict(self.scores), "movement_w0": dict(self.w0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        params = dict(self.params)
        for name, value in state.get("movement_scores", {}).items():
            self.scores[name].copy_(value)
        self.w0 = {
            name: value.to(device=params[name].device, dtype=params[name].dtype)
            for name, value in state.get("movement_w0", {}).items()
        }
