"""Which tensors move with a structure: torch-pruning's dependency graph (DepGraph, Fang et al. 2023).

Removing a conv's output channel also removes that entry of the batch norm after it,
the matching input channel of every consumer (across residual additions, through a
flatten into a Linear layer as a block of columns), and so on. The `torch-pruning`
package traces the model once and answers this for any layer; surgery asks it which
(tensor, axis, positions) follow the rows it removes, then cuts every tensor and its
optimizer state itself (lib/surgery/cut.py): torch-pruning's own pruning rebuilds the
layers in place and drops the optimizer state (its issue #140), so we use only its graph.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

Follower = tuple[str, int, tuple[int, ...]]  # (state name, axis, positions)


def followers(model: nn.Module, example: torch.Tensor) -> Callable[[str, list[int]], list[Follower]]:
    """A function ``(weight name, rows) -> every tensor entry removed with those output rows``, traced
    through ``model`` on ``example`` (one input batch)."""
    import torch_pruning as tp  # only surgery on conv families needs it

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {module: name for name, module in model.named_modules()}

    def of(weight: str, rows: list[int]) -> list[Follower]:
        module = model.get_submodule(weight.rsplit(".", 1)[0])
        handler = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        found = []
        for dep, idxs in graph.get_pruning_group(module, handler, idxs=rows):
            name = names.get(dep.target.module)
            if name is None:  # element-wise ops, reshapes: no tensors of their own
                continue
            axis = 0 if dep.handler.__name__ == "prune_out_channels" else 1
            positions = tuple(sorted(int(getattr(i, "idx", i)) for i in idxs))
            owner = dep.target.module
            for local, tensor in chain(owner.named_parameters(recurse=False), owner.named_buffers(recurse=False)):
                if tensor.dim() > axis:  # in-channels: the weight only; num_batches_tracked: never
                    found.append((f"{name}.{local}" if name else local, axis, positions))
        return found

    return of
