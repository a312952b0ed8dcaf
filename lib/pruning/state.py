"""``state``: AdamWPrune's state-based pruning, scored by a bitter variant (lib/pruning/bitter.py).

Only with the ``adamwprune`` optimizer: the scores come from its own
``exp_avg`` / ``exp_avg_sq`` and the masks live inside it (bit-packed,
``AdamWPrune.masks``). This pruner decides *when* (the base class schedule)
and *what* (scores -> threshold); the optimizer stores and applies the masks.

- Mask update (on schedule): scores one tensor at a time as the threshold
  reads them; the global threshold of ``settings.threshold`` (exact by
  default), or for bitter4 each tensor's own exact cut at its per-layer
  target. Masks are packed and handed to ``AdamWPrune.set_masks``, which
  zeroes pruned weights and their exp_avg / exp_avg_sq / max_exp_avg_sq.
- Every step: ``before_step`` calls ``AdamWPrune.mask_gradients``.

One owner: the optimizer's store is the only mask store. ``self.masks`` is a view
of it by weight name (a property, no copy), so checkpoints (the pruner's state
dict carries the masks; the optimizer's carries none), ``mask(name)``, surgery
and ``buffer_bytes`` (1 bit per prunable weight) work as for every pruner, and
assigning ``self.masks`` installs the masks in the optimizer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import PruneSettings
from lib.optim import adamwprune  # the module, not the class: lib.optim and lib.pruning import each other
from lib.pruning import bitter
from lib.pruning.base import Pruner
from lib.pruning.sharded import local, sharded_exact_mask
from lib.pruning.threshold import LazyScores, global_exact_mask

DEFAULT_VARIANT = "bitter7"  # the research's recommended variant, used when none is configured


class StatePruner(Pruner):
    """Prune by a bitter variant's score of ``w``, ``exp_avg`` and ``exp_avg_sq``; masks kept in AdamWPrune."""

    name = "state"
    pack_masks: ClassVar[bool] = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings):
        if not isinstance(optimizer, adamwprune.AdamWPrune):
            got = type(optimizer).__name__ if optimizer is not None else "none"
            raise ConfigError(
                "CONFIG_PRUNING_STATE (state pruning) needs CONFIG_OPTIMIZER_ADAMWPRUNE: it prunes from "
                f"AdamWPrune's own Adam state and keeps its masks there; got optimizer {got}"
            )
        super().__init__(model, optimizer, settings)
        self.optimizer: adamwprune.AdamWPrune = optimizer
        self.variant = settings.variant or DEFAULT_VARIANT
        self.score = bitter.score_fn(self.variant, settings.bitter8_form)
        # beta1 of each weight's group, for bitter8's bias correction.
        self.beta1 = {id(p): group.get("betas", (0.9, 0.999))[0] for group in optimizer.param_groups
                      for p in group["params"]}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The optimizer's packed masks by weight name: a view of its store, never a copy."""
        store = self.optimizer.masks
        return {name: store[param] for name, param in self.params if param in store}

    @masks.setter
    def masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Install ``masks`` (by weight name) as the optimizer's whole store; it zeroes what they prune."""
        params = dict(self.params)
        self.optimizer.clear_masks()
        self.optimizer.set_masks({params[name]: mask for name, mask in masks.items()})

    def importance(self, name: str, param: nn.Parameter) -> torch.Tensor:
        state = self.optimizer.state.get(param)  # sharded (FSDP2): the score of this rank's shard
        shards = {key: local(value) for key, value in state.items()} if state is not None else None
        return bitter.importance(self.score, local(param), shards, self.beta1[id(param)])

    def importance_at(self, name: str, param: nn.Parameter, index: torch.Tensor) -> torch.Tensor:
        """The score at flattened positions ``index`` only: every bitter score is elementwise in w, m and v."""
        state = self.optimizer.state.get(param)
        shaped = {key: value.reshape(-1)[index] if isinstance(value, torch.Tensor) and value.shape == param.shape
                  else value for key, value in (state or {}).items()}
        return bitter.importance(self.score, param.detach().reshape(-1)[index], shaped, self.beta1[id(param)])

    def weight_is_score(self) -> bool:
        return self.variant in ("bitter1", "bitter2")  # |w|

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero pruned weights' gradients, through the optimizer that owns the masks."""
        self.optimizer.mask_gradients()

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Score, threshold and install new masks in the optimizer (which zeroes the pruned entries)."""
        if (per_layer := self.layer_masks(sparsity)) is not None:  # CONFIG_SPARSITY_DISTRIBUTION
            for (_, param), mask in zip(self.params, per_layer, strict=True):
                self.optimizer.set_masks({param: mask})
        elif self.variant in bitter.PER_LAYER:
            count = len(self.params)
            for index, (_, param) in enumerate(self.params):
                target = bitter.layer_sparsity(sparsity, index, count)
                mask = (sharded_exact_mask([self.ranked(index)], target, param.numel()) if self.sharded
                        else global_exact_mask([self.ranked(index)], target))[0]
                self.optimizer.set_masks({param: mask})
        elif (packed := self.one_pass_masks(sparsity)) is not None:
            params = dict(self.params)
            for name, mask in packed.items():
                self.optimizer.masks[params[name]] = mask  # already applied to the weight and its state
        else:
            scores = LazyScores(self.ranked, [local(p).numel() for _, p in self.params])
            masks = list(sharded_exact_mask(scores, sparsity, self.prunable_count()) if self.sharded
                         else self.threshold(scores, sparsity, seed=self.step))
            for _, param in self.params:
                self.optimizer.set_masks({param: masks.pop(0)})  # packed there; each bool mask freed in turn
        self.applied = sparsity

