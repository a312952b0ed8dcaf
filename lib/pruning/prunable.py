"""Which tensors a pruner may sparsify: the weights of Linear and Conv layers.

Embedding tables, and a Linear head whose weight *is* an embedding table (tied
weights, as in GPT-2), stay dense: pruning a tied head would also prune the
token embeddings. Biases and norms are tiny and stay dense too.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.optim.groups import embedding_param_ids

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every prunable layer, in module order, each tensor once.

    The name is the parameter's name in ``model.state_dict()``; a weight
    shared by several layers keeps the name of the first one.
    """
    skip = embedding_param_ids(model)
    seen: set[int] = set()
    found: list[tuple[str, nn.Parameter]] = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, PRUNABLE_TYPES) or not isinstance(weight, nn.Parameter):
            continue
        if id(weight) in skip or id(weight) in seen:
            continue
        seen.add(id(weight))
        found.append((f"{module_name}.weight" if module_name else "weight", weight))
    return found


@torch.no_grad()
def zero_count(params: list[tuple[str, nn.Parameter]]) -> int:
    """How many entries of ``params`` are exactly zero (sparsity is measured on the weights, not the masks)."""
    return sum(int((param == 0).sum()) for _, param in params)


def zero_fraction(model: nn.Module) -> float:
    """Share of all of ``model``'s prunable weights that are exactly zero."""
    params = prunable_parameters(model)
    total = sum(p.numel() for _, p in params)
    return zero_count(params) / total if total else 0.0
