"""``nm``: N:M semi-structured sparsity (docs/algorithms.md, "N:M sparsity").

In every group of M consecutive weights along a layer's input dimension the N most
important stay (2:4 by default): the pattern NVIDIA's sparse tensor cores run. The input
dimension of a Linear weight (out, in) is ``in``; of a Conv weight (out, in/groups, *kernel)
it is the whole flattened row, the K of the convolution as a matrix product (im2col), whose
entries are consecutive in memory. A layer whose input dimension M does not divide cannot
hold the pattern and stays dense, as NVIDIA's ASP leaves it; the pruner names those layers
(``report()``), prunes only the others, and counts its sparsity over them.

Gradual pruning keeps the pattern's promise at every mask update: at a scheduled sparsity s
below the pattern's 1 - N/M, the weights pruned are the globally least important among each
group's M - N least important ones, so no group ever loses more than M - N, and at the
target every group holds exactly N. Importance is magnitude pruning's metric.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lib.core.errors import ConfigError
from lib.core.spec import PruneSettings
from lib.pruning.magnitude import MagnitudePruner
from lib.pruning.prunable import prunable_parameters
from lib.pruning.schedule import SparsitySchedule
from lib.pruning.threshold import LazyScores


def check_pattern(n: int, m: int, where: str) -> None:
    """One line unless 1 <= N < M."""
    if not 1 <= n < m:
        raise ConfigError(f"N:M pattern {n}:{m} ({where}): N must be at least 1 and below M, e.g. 2:4")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); one line for anything else."""
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise ConfigError(f"pattern {text!r} is not N:M (e.g. 2:4)")
    check_pattern(int(n), int(m), "PATTERNS=")
    return int(n), int(m)


def input_dim(param: Tensor) -> int:
    """Entries of one output row: in_features (Linear), in_channels/groups x kernel (Conv)."""
    return param[0].numel()


def split_by_fit(params: list[tuple[str, nn.Parameter]], n: int, m: int,
                 model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], dict[str, int]]:
    """(the weights that can hold N:M, {name: input dimension} of those that cannot); one line when none can."""
    fit = [(name, p) for name, p in params if input_dim(p) % m == 0]
    unfit = {name: input_dim(p) for name, p in params if input_dim(p) % m}
    if not fit:
        shown = ", ".join(f"{name} ({dim})" for name, dim in list(unfit.items())[:4])
        raise ConfigError(f"N:M sparsity {n}:{m}: M={m} divides the input dimension of none of "
                          f"{type(model).__name__}'s prunable layers ({shown}{', ...' if len(unfit) > 4 else ''}); "
                          f"choose an M that divides one of them")
    return fit, unfit


def keep_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Bool keep-mask shaped like ``score``: the N highest of every M consecutive entries of each row."""
    groups = score.reshape(-1, m)
    lowest = groups.argsort(dim=1, stable=True)[:, : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(1, lowest, False)
    return keep.reshape(score.shape)


def candidates(score: Tensor, n: int, m: int) -> Tensor:
    """``score`` at each group's M - N lowest entries (those N:M may prune) and +inf elsewhere."""
    groups = score.reshape(-1, m)
    lowest = groups.argsort(dim=1, stable=True)[:, : m - n]
    out = torch.full_like(groups, float("inf"))
    out.scatter_(1, lowest, groups.gather(1, lowest))
    return out.reshape(score.shape)


def is_exactly_nm(mask: Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive entries along the rows keeps exactly N."""
    return bool((mask.reshape(-1, m).sum(dim=1) == n).all())


class NMPruner(MagnitudePruner):
    """Gradual N:M pruning (N, M from ``settings.nm_n``, ``settings.nm_m``); target 1 - N/M."""

    name = "nm"
    pack_masks = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings):
        self.n, self.m = settings.nm_n, settings.nm_m
        check_pattern(self.n, self.m, "CONFIG_PRUNING_NM_N and CONFIG_PRUNING_NM_M")
        super().__init__(model, optimizer, settings)

    @property
    def pattern_sparsity(self) -> float:
        return 1 - self.n / self.m

    def select_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        fit, self.dense_layers = split_by_fit(prunable_parameters(model), self.n, self.m, model)
        return fit

    def make_schedule(self, settings: PruneSettings) -> SparsitySchedule:
        """The configured schedule toward the pattern's own sparsity, whatever the sparsity axis says."""
        return SparsitySchedule(settings.schedule, 1 - settings.nm_n / settings.nm_m, settings.start,
                                settings.end, settings.frequency)

    def masks_final(self) -> bool:
        """Only the target's masks hold the pattern (every group exactly N): a step within the sparsity
        tolerance but before the last update leaves groups with more, which sparse kernels refuse."""
        return self.applied >= self.pattern_sparsity - 1e-12

    def one_pass_masks(self, sparsity: float) -> dict[str, Tensor] | None:
        return None  # the fused update knows one global cut, not groups

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        self.metric.sync()
        if sparsity >= self.pattern_sparsity - 1e-12:
            masks = [keep_mask(self.ranked(i), self.n, self.m) for i in range(len(self.params))]
        else:
            lazy = LazyScores(lambda i: candidates(self.ranked(i), self.n, self.m),
                              [p.numel() for _, p in self.params])
            masks = self.threshold(lazy, sparsity, seed=self.step)
        self.masks = {name: self._stored(mask) for (name, _), mask in zip(self.params, masks, strict=True)}
        self.applied = sparsity
        self.apply_masks()

    def report(self) -> dict[str, Any]:
        """The pattern, and the layers too narrow for it (left dense, outside the sparsity counted)."""
        return {"pattern": f"{self.n}:{self.m}", "dense_layers": dict(self.dense_layers),
                "covered_weights": self.prunable_count()}
