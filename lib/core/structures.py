"""Whole structures of a model that pruning can remove: the model-agnostic interface (docs/algorithms.md, "Units").

A model family describes its own structures (``model.structures()``) and the residual
blocks it can drop (``model.residual_blocks()``), in its own folder; pruners, statistics
and surgery read only these descriptions.

- A ``Structure`` is one removable unit: an MLP neuron (a row of the first MLP matrix
  and the matching column of the second), an attention head (its rows of q, k and v and
  its columns of the output projection), a conv channel inside a residual block, a
  LeNet-5 channel or unit. Its ``parts`` are (weight name, axis, positions): the slices
  of prunable weights that belong to it. Structures of one ``group`` (a layer's heads, a
  layer's neurons) are alternatives: pruning keeps at least one of each group.
- A ``ResidualBlock`` is a residual block whose output equals its input once all of its
  parameters are zero (an identity shortcut and a branch that then adds 0), so zeroing
  it during training is exactly dropping it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Part:
    """The positions ``index`` along axis ``dim`` of the prunable weight ``param`` (a state_dict name)."""

    param: str
    dim: int
    index: tuple[int, ...]


KINDS = {"heads": "head", "neurons": "neuron", "channels": "channel", "units": "unit"}  # plural (settings) -> kind


@dataclass(frozen=True)
class Structure:
    kind: str  # one of KINDS' values
    group: str  # the layer it belongs to, e.g. "h.3.mlp"; one structure per group always stays
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class ResidualBlock:
    name: str  # module path, e.g. "h.3" or "layer2.1"
    module: nn.Module


def structures(model: nn.Module) -> list[Structure]:
    """The removable structures ``model`` describes (none when its family describes none)."""
    describe = getattr(model, "structures", None)
    return list(describe()) if callable(describe) else []


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """The residual blocks ``model`` can drop, in forward order (none when it has none)."""
    describe = getattr(model, "residual_blocks", None)
    return list(describe()) if callable(describe) else []


def rows_and_columns(kind: str, group: str, producer: str, consumer: str, count: int,
                     rows: int = 1, columns: int = 1) -> list[Structure]:
    """The common case: structure i is ``rows`` rows of ``producer`` (its outputs) and the ``columns``
    columns of ``consumer`` that read them (a neuron, a channel, a unit)."""
    return [Structure(kind, group, (Part(producer, 0, tuple(range(i * rows, (i + 1) * rows))),
                                    Part(consumer, 1, tuple(range(i * columns, (i + 1) * columns)))))
            for i in range(count)]
