"""``structured`` and ``layer_dropout``: remove whole structures during training.
(docs/algorithms.md, "Structured pruning and layer dropout")

Both mask: a removed structure's weights, gradients and optimizer state stay exactly zero,
so the model computes what the smaller model surgery builds later would compute, and the
methods run in the matrix like every other. The units come from the model family's own
description (lib/core/structures.py): heads and MLP neurons (GPT-2), channels inside residual
blocks (ResNet), channels and units (LeNet-5) for ``structured``; whole residual blocks
for ``layer_dropout``.

At each mask update the units still present are ranked by their weights' importance
under the chosen metric (lib/pruning/importance.py), summed and divided by the unit's
size so that heads, neurons and channels of different sizes compare, and removed
lowest first until the removed weights reach the scheduled fraction of the prunable
weights. A unit that would overshoot the target by more than the target is still short
is passed over for smaller ones after it, so the reached sparsity lands close to the
target; one unit of every group (a layer's heads, a layer's neurons, the blocks) always
stays. Units removed once stay removed: masks only grow.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.errors import ConfigError
from lib.core.spec import PruneSettings
from lib.core.structures import Part, Structure, residual_blocks, structures
from lib.pruning.magnitude import MagnitudePruner
from lib.pruning.threshold import prune_count


class StructuredPruner(MagnitudePruner):
    """Masks whole heads, neurons, channels or units (``Structure``s), least important first; the metric,
    its per-step work, buffers and checkpoint state are magnitude pruning's."""

    name = "structured"
    pack_masks = True
    whole_structures = True
    limits = "one unit of every layer stays, and weights in no unit are never removed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings):
        super().__init__(model, optimizer, settings)
        self.shapes = {name: p.shape for name, p in self.params}
        self.units = self.describe(model)
        if not self.units:
            raise ConfigError(self.nothing_to_remove(model))
        self.index = _Indices()
        self.reachable = self._reachable()  # the matrix checks targets against it (check_target): once
        # surgery has cut the model, the target counts the removed weights too, and this model alone is smaller

    def check_target(self, target: float) -> None:
        """One line when ``target`` is beyond what this method can remove from this model."""
        if target > self.reachable:
            raise ConfigError(f"{self.name} pruning can remove at most {100 * self.reachable:.1f} % of "
                              f"{type(self.model).__name__}'s prunable weights ({self.limits}), not "
                              f"{100 * target:g} %; lower the sparsity target")

    # -- what layer_dropout overrides ----------------------------------------------------------

    def describe(self, model: nn.Module) -> list[Structure]:
        """The units this method removes, restricted to prunable weights."""
        return [u for u in structures(model) if all(p.param in self.shapes for p in u.parts)]

    def nothing_to_remove(self, model: nn.Module) -> str:
        return (f"structured pruning needs a model that describes its structures (lib/core/structures.py); "
                f"{type(model).__name__} describes none: choose another pruning method")

    # -- the mask update -----------------------------------------------------------------------

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        self.metric.sync()
        masks = {name: self._bool_mask(name) for name, _ in self.params}
        total = self.prunable_count()
        removed = total - sum(int(m.sum()) for m in masks.values())
        needed = prune_count(total, sparsity)
        alive = Counter(u.group for u in self.units if not self._gone(u, masks))
        for unit in self._ranked(masks):
            if removed >= needed:
                break
            if alive[unit.group] <= 1:
                continue
            gain = sum(int(self._slice(masks, part).sum()) for part in unit.parts)
            if removed + gain - needed > needed - removed:
                continue  # overshoots more than it falls short: a smaller unit further down may fit
            for part in unit.parts:
                masks[part.param].index_fill_(part.dim, self.index[part].to(masks[part.param].device), False)
            removed += gain
            alive[unit.group] -= 1
        self.masks = {name: self._stored(mask) for name, mask in masks.items()}
        self.applied = sparsity
        self.apply_masks()

    def _ranked(self, masks: dict[str, Tensor]) -> list[Structure]:
        """Units still present, lowest mean importance first (ties: model order)."""
        params = dict(self.params)
        reduced: dict[tuple[str, int], Tensor] = {}
        for name in {p.param for u in self.units for p in u.parts}:
            score = self.metric.score(name, params[name]).detach().float()
            for dim in {p.dim for u in self.units for p in u.parts if p.param == name}:
                others = [d for d in range(score.dim()) if d != dim]
                reduced[(name, dim)] = score.sum(dim=others).cpu() if others else score.cpu()
        scored = []
        for order, unit in enumerate(self.units):
            if self._gone(unit, masks):
                continue
            total = sum(float(reduced[(p.param, p.dim)][self.index[p]].sum()) for p in unit.parts)
            scored.append((total / self._size(unit), order, unit))
        scored.sort(key=lambda item: item[:2])
        return [unit for _, _, unit in scored]

    def _size(self, unit: Structure) -> int:
        return sum(len(p.index) * self.shapes[p.param].numel() // self.shapes[p.param][p.dim] for p in unit.parts)

    def _slice(self, masks: dict[str, Tensor], part: Part) -> Tensor:
        mask = masks[part.param]
        return mask.index_select(part.dim, self.index[part].to(mask.device))

    def _gone(self, unit: Structure, masks: dict[str, Tensor]) -> bool:
        return all(not bool(self._slice(masks, part).any()) for part in unit.parts)

    def _bool_mask(self, name: str) -> Tensor:
        mask = self.mask(name)
        if mask is None:
            return torch.ones(self.shapes[name], dtype=torch.bool, device=dict(self.params)[name].device)
        return mask.clone()

    def _reachable(self) -> float:
        """The largest fraction of prunable weights this method can remove: every unit but the largest
        of each group. A unit's parts are whole rows or columns, so a weight survives exactly when each
        of its indices does, and the count is a product per tensor (no masks built)."""
        keep: dict[str, tuple[int, Structure]] = {}
        for unit in self.units:
            size = self._size(unit)
            if unit.group not in keep or size > keep[unit.group][0]:
                keep[unit.group] = (size, unit)
        kept = {id(unit) for _, unit in keep.values()}
        dropped: dict[tuple[str, int], list[int]] = {}
        for unit in self.units:
            for part in unit.parts:
                positions = dropped.setdefault((part.param, part.dim), [])
                if id(unit) not in kept:
                    positions.extend(part.index)
        alive = {}  # one indexed write per axis: ResNet-50 has thousands of channel units
        for (name, dim), positions in dropped.items():
            alive[(name, dim)] = torch.ones(self.shapes[name][dim], dtype=torch.bool)
            alive[(name, dim)][positions] = False
        removed = 0
        for name, shape in self.shapes.items():
            survivors = shape.numel()
            for dim, size in enumerate(shape):
                if (name, dim) in alive:
                    survivors = survivors // size * int(alive[(name, dim)].sum())
            removed += shape.numel() - survivors
        return removed / self.prunable_count()

    def removed_units(self) -> list[Structure]:
        """The units the masks remove whole (what surgery cuts, lib/surgery/cut.py)."""
        masks = {name: self._bool_mask(name) for name, _ in self.params}
        return [unit for unit in self.units if self._gone(unit, masks)]

    def removed_blocks(self) -> list[str]:
        """Residual blocks removed whole: none, for units smaller than blocks."""
        return []

    def report(self) -> dict[str, Any]:
        """How many units of each kind the masks remove, for summary.json."""
        masks = {name: self._bool_mask(name) for name, _ in self.params}
        counts: dict[str, dict[str, int]] = {}
        for unit in self.units:
            entry = counts.setdefault(unit.kind, {"removed": 0, "total": 0})
            entry["total"] += 1
            entry["removed"] += self._gone(unit, masks)
        return {"structures": counts}


class LayerDropoutPruner(StructuredPruner):
    """Masks whole residual blocks: every parameter of a dropped block is zero, so it passes its input
    through unchanged (lib/structures.ResidualBlock), exactly as if it were removed."""

    name = "layer-dropout"
    limits = "one block always stays, and blocks that change the shape cannot be dropped"

    def describe(self, model: nn.Module) -> list[Structure]:
        self.blocks = residual_blocks(model)
        self.others: dict[str, list[nn.Parameter]] = {}  # block -> its parameters that are not prunable weights
        units = []
        for block in self.blocks:
            named = [(f"{block.name}.{n}", p) for n, p in block.module.named_parameters()]
            weights = [n for n, _ in named if n in self.shapes]
            units.append(Structure("block", "blocks", tuple(Part(n, 0, tuple(range(self.shapes[n][0])))
                                                            for n in weights)))
            self.others[block.name] = [p for n, p in named if n not in self.shapes]
        return units

    def nothing_to_remove(self, model: nn.Module) -> str:
        return (f"layer-dropout pruning needs residual blocks that can be dropped; {type(model).__name__} has "
                f"none: choose structured or magnitude pruning")

    def removed_units(self) -> list[Structure]:
        return []  # its units are whole blocks: removed_blocks()

    def removed_blocks(self) -> list[str]:
        gone = {id(unit) for unit in super().removed_units()}
        return [block.name for block, unit in zip(self.blocks, self.units, strict=True) if id(unit) in gone]

    def _dropped(self) -> list[nn.Parameter]:
        masks = {name: self._bool_mask(name) for name, _ in self.params}
        return [p for block, unit in zip(self.blocks, self.units, strict=True) if self._gone(unit, masks)
                for p in self.others[block.name]]

    @torch.no_grad()
    def apply_masks(self) -> None:
        super().apply_masks()
        self.silent = self._dropped()  # biases and norms of dropped blocks: zero, and kept zero
        for param in self.silent:
            param.zero_()
            for value in self._state_tensors(param):
                value.zero_()

    @torch.no_grad()
    def before_step(self) -> None:
        super().before_step()
        for param in getattr(self, "silent", []):
            if param.grad is not None:
                param.grad.zero_()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.silent = self._dropped()


class _Indices(dict):
    """``part -> LongTensor of its positions``, made on first use (GPT-2 124M has 74k parts)."""

    def __missing__(self, part: Part) -> Tensor:
        self[part] = index = torch.tensor(part.index, dtype=torch.long)
        return index
