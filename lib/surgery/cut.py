"""Physically removing structures, with every piece of state carried across (docs/algorithms.md, "Dependency rules").

Model-agnostic: a model family describes its structures (lib/core/structures.py) and says
what its architecture becomes without some of them (``model.architecture_without``);
everything else is index bookkeeping done here once:

- ``plan`` turns removed structures and blocks into a ``Cut``: for every tensor of the
  smaller model's state, the tensor of the old model it comes from and, per axis, the
  positions that survive. A structure's part on axis 0 of a weight (its rows) takes
  the matching entries of that layer's bias with it; a dropped block's tensors go, and
  the blocks after it in the same list move up (``h.5`` becomes ``h.4``).
- ``carry_model``, ``carry_optimizer`` and ``carry_pruner`` apply a Cut to a model's
  state dict, to an optimizer's state dict (every per-weight tensor: exp_avg,
  exp_avg_sq, max_exp_avg_sq, momentum buffers; scalars
  such as ``step`` and the SPAM clock unchanged) and to a pruner's state dict (masks,
  packed or not, AdamWPrune's included, and movement scores). Values are selected, never recomputed: every
  surviving weight keeps its state bit for bit.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.structures import Structure
from lib.optim import bitmask
from lib.surgery.dependency import Follower


@dataclass
class Cut:
    removed: list[Structure]
    blocks: list[str]  # names of the residual blocks removed whole
    architecture: dict[str, Any]  # what ``task.build_model(spec, architecture)`` builds
    keep: dict[str, tuple[str, dict[int, Tensor]]]  # new state name -> (old name, axis -> surviving positions)

    def counts(self) -> dict[str, int]:
        """Structures removed, by kind (``block`` for whole blocks)."""
        counts = Counter(unit.kind for unit in self.removed)
        if self.blocks:
            counts["block"] = len(self.blocks)
        return dict(counts)


def plan(model: nn.Module, removed: list[Structure], blocks: list[str],
         followers: Callable[[str, list[int]], list[Follower]] | None = None) -> Cut:
    """The Cut that removes ``removed`` and the residual blocks named ``blocks`` from ``model``.

    ``followers`` (lib/surgery/dependency.py) names every tensor entry that goes with a weight's rows; without
    it, a weight's rows take only the same entries of its bias (enough for GPT-2's Linear layers)."""
    state = model.state_dict()
    gone: dict[tuple[str, int], set[int]] = {}
    rows: dict[str, set[int]] = {}
    for unit in removed:
        for part in unit.parts:
            gone.setdefault((part.param, part.dim), set()).update(part.index)
            if part.dim == 0:
                rows.setdefault(part.param, set()).update(part.index)
    for weight, positions in rows.items():
        bias = re.sub(r"weight$", "bias", weight)
        entries = followers(weight, sorted(positions)) if followers else [(bias, 0, tuple(positions))]
        for name, dim, index in entries:
            if name in state and name != weight:
                gone.setdefault((name, dim), set()).update(index)
    keep: dict[str, tuple[str, dict[int, Tensor]]] = {}
    for name, tensor in state.items():
        new = _moved(name, blocks)
        if new is None:
            continue
        axes = {}
        for (param, dim), positions in gone.items():
            if param == name:
                axes[dim] = torch.tensor([i for i in range(tensor.shape[dim]) if i not in positions], dtype=torch.long)
        keep[new] = (name, axes)
    describe = getattr(model, "architecture_without", None)
    if not callable(describe):
        raise TypeError(f"{type(model).__name__} has no architecture_without(): its family does not support surgery")
    return Cut(removed, blocks, describe(removed, blocks), keep)


def _moved(name: str, blocks: list[str]) -> str | None:
    """``name`` after the blocks are dropped from their lists; None when it belongs to a dropped one."""
    for block in blocks:
        if name.startswith(block + "."):
            return None
    for prefix in {b.rsplit(".", 1)[0] for b in blocks}:
        match = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$", name)
        if match:
            index = int(match.group(1))
            before = sum(int(b.rsplit(".", 1)[1]) < index for b in blocks if b.rsplit(".", 1)[0] == prefix)
            name = f"{prefix}.{index - before}.{match.group(2)}"
    return name


def cut_tensor(tensor: Tensor, axes: dict[int, Tensor]) -> Tensor:
    """The surviving positions of ``tensor`` along each axis (a copy)."""
    for dim, index in axes.items():
        tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor.clone() if not axes else tensor


def carry_model(state: dict[str, Tensor], cut: Cut) -> dict[str, Tensor]:
    """The smaller model's state dict: every surviving value of ``state``."""
    return {new: cut_tensor(state[old], axes) for new, (old, axes) in cut.keep.items()}


def carry_optimizer(old_state: dict[str, Any], old_model: nn.Module, old_optimizer: torch.optim.Optimizer,
                    new_model: nn.Module, new_optimizer: torch.optim.Optimizer, cut: Cut) -> dict[str, Any]:
    """``old_state`` (``old_optimizer.state_dict()``) for ``new_optimizer`` over the smaller model.

    Entries are matched by parameter name through each optimizer's own parameter order; a
    tensor shaped like its parameter is cut, anything else (``step``) is copied."""
    old_names, new_names = _order(old_model, old_optimizer), _order(new_model, new_optimizer)
    old_index = {name: i for i, name in enumerate(old_names)}
    shapes = {name: p.shape for name, p in old_model.named_parameters()}
    state: dict[int, dict[str, Any]] = {}
    for i, new in enumerate(new_names):
        old, axes = cut.keep[new]
        entry = old_state["state"].get(old_index[old])
        if entry is not None:
            state[i] = {k: _cut_value(v, shapes[old], axes) for k, v in entry.items()}
    fresh = new_optimizer.state_dict()
    groups = [{**old, "params": new["params"]} for old, new in zip(old_state["param_groups"], fresh["param_groups"],
                                                                     strict=True)]
    # Masks are the pruner's to carry (carry_pruner), AdamWPrune's included; older optimizer states held a copy.
    return {**{k: v for k, v in old_state.items() if k != "masks"}, "state": state, "param_groups": groups}


def carry_pruner(state: dict[str, Any], old_model: nn.Module, cut: Cut, removed_weights: int) -> dict[str, Any]:
    """A pruner's state dict for the smaller model: every {weight name: tensor} map cut, and the count of
    prunable weights the surgery removed added to ``removed`` (sparsity keeps counting them)."""
    shapes = {name: p.shape for name, p in old_model.named_parameters()}
    renamed = {old: new for new, (old, _) in cut.keep.items()}
    carried: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict) and value and set(value) <= set(shapes):
            carried[key] = {renamed[name]: _cut_value(t, shapes[name], cut.keep[renamed[name]][1])
                            for name, t in value.items() if name in renamed}
        else:
            carried[key] = value
    carried["removed"] = int(state.get("removed", 0)) + removed_weights
    return carried


def _cut_value(value: Any, shape: torch.Size, axes: dict[int, Tensor]) -> Any:
    """A per-weight value cut like its weight: dense (shaped like it) or a packed bit mask of it."""
    if not isinstance(value, Tensor):
        return value
    if value.shape == shape:
        return cut_tensor(value, axes)
    if value.dtype == torch.uint8 and value.shape == (bitmask.packed_size(shape.numel()),):
        return bitmask.pack(cut_tensor(bitmask.unpack(value, shape), axes))
    return value.clone()


def _order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order the optimizer's state dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
