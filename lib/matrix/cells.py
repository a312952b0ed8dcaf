"""The matrix's cells: the product of every axis, the names that say what varied, and random search.

The fixed axes (model, optimizer, bitter variant, pruning method, sparsity, seed) combine as always
(``combinations``); each list axis that is set (lib/config/axes.py) multiplies the cells of the methods that use
its setting. A run's name carries every setting that varies among the runs of its model, optimizer, variant and
method, by the one definition of a method's identity that comparisons use (lib/core/spec.py,
``method_identity``), so a matrix that varies nothing new keeps today's names.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import defaultdict
from typing import Any

from lib.config import Config
from lib.config.axes import USES
from lib.core.errors import ConfigError
from lib.core.spec import RunSpec, method_identity

# How a varied setting reads in a run name (the value follows); any other varied setting: "<field>-<value>".
LABELS = {"optim.lr": "lr", "prune.importance": "", "prune.schedule": "sched-", "prune.threshold": "thr-"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: the fixed axes, and the settings the list axes give it."""

    model: str
    optimizer: str
    variant: str
    pruning: str
    sparsity: float
    seed: int
    lr: float | None = None  # None: the optimizer's own CONFIG_<OPT>_LR
    prune: tuple[tuple[str, str], ...] = ()  # (PruneSettings field, value) from IMPORTANCE/SCHEDULE/THRESHOLD_LIST


def valid_pair(optimizer: str, pruning: str) -> bool:
    """State pruning needs AdamWPrune's moments; AdamWPrune prunes only from them (or not at all)."""
    if pruning == "state":
        return optimizer == "adamwprune"
    return optimizer != "adamwprune" or pruning == "none"


def combinations(config: Config) -> list[tuple[str, str, str, str, float, int]]:
    """(model, optimizer, variant, pruning, sparsity, seed) for every valid run of the fixed axes, in a stable order.

    Rules: pruning "none" runs once, at sparsity 0, and "nm" once, at its pattern's 1 - N/M,
    whatever the sparsity axis holds;
    state pruning runs only with AdamWPrune, and AdamWPrune only with none or state;
    the bitter variants expand only for AdamWPrune with state pruning.
    """
    result = []
    for model, optimizer, pruning in itertools.product(config.models, config.optimizers, config.prunings):
        if not valid_pair(optimizer, pruning):
            continue
        sparsities = {"none": (0.0,), "nm": (1 - config.prune.nm_n / config.prune.nm_m,)}.get(
            pruning, config.sparsities)
        variants = config.variants if (optimizer, pruning) == ("adamwprune", "state") else ("",)
        for variant, sparsity, seed in itertools.product(variants, sparsities, config.seeds):
            result.append((model, optimizer, variant, pruning, sparsity, seed))
    return result


def grid(config: Config) -> list[Cell]:
    """Every cell: the fixed axes' combinations, each times the list axes that apply to its optimizer and method."""
    lists = config.axes.settings()
    cells = []
    for model, optimizer, variant, pruning, sparsity, seed in combinations(config):
        used = [(name, values) for name, values in lists.items() if pruning in USES[name]]
        for lr in config.axes.lrs.get(optimizer, (None,)):
            for values in itertools.product(*(values for _, values in used)):
                cells.append(Cell(model, optimizer, variant, pruning, sparsity, seed, lr,
                                  tuple(zip((name for name, _ in used), values, strict=True))))
    return cells


def chosen(config: Config, cells: list[Cell]) -> list[Cell]:
    """The cells to run: all of them (grid), or CONFIG_MATRIX_SEARCH_RUNS drawn with its seed, in grid order."""
    if config.axes.search != "random":
        return cells
    wanted = config.axes.search_runs
    if wanted > len(cells):
        raise ConfigError(f"CONFIG_MATRIX_SEARCH_RUNS={wanted} is more than the {len(cells)} cells of the grid; "
                          f"lower it, or choose MATRIX_SEARCH_GRID")
    picks = sorted(random.Random(config.axes.search_seed).sample(range(len(cells)), wanted))
    return [cells[i] for i in picks]


def apply(cell: Cell, config: Config) -> dict[str, Any]:
    """The optimizer and pruning settings of ``cell``: the configured ones with its list values put in."""
    optim = config.optim[cell.optimizer]
    if cell.lr is not None:
        optim = dataclasses.replace(optim, lr=cell.lr)
    prune = {**config.prune.__dict__, "method": cell.pruning, "target": cell.sparsity, "variant": cell.variant,
             **dict(cell.prune)}
    return {"optim": optim, "prune": prune}


def group(spec: RunSpec) -> tuple[str, str, str, str]:
    """The runs a name must tell apart: same model, optimizer, bitter variant and method."""
    return spec.model, spec.optimizer, spec.prune.variant, spec.pruning


def varied(specs: list[RunSpec]) -> dict[tuple[str, str, str, str], list[str]]:
    """For each group, the identity settings that differ among its runs (sorted; empty: only seed and target)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for spec in specs:
        groups[group(spec)].append(method_identity(spec.to_dict()))
    return {key: sorted(k for k in ids[0] if any(other.get(k) != ids[0][k] for other in ids[1:]))
            for key, ids in groups.items()}


def token(key: str, value: Any) -> str:
    """How ``key`` = ``value`` reads in a run name, e.g. lr0.003, gradient-sensitivity, sched-linear."""
    return f"{LABELS.get(key, key.split('.')[-1] + '-')}{text(value)}"


def text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_of(spec: RunSpec, keys: dict[tuple[str, str, str, str], list[str]]) -> dict[str, Any]:
    """The values of the settings ``spec``'s group varies."""
    identity = method_identity(spec.to_dict())
    return {key: identity[key] for key in keys.get(group(spec), [])}


def tokens(spec: RunSpec, keys: dict[tuple[str, str, str, str], list[str]]) -> tuple[str, ...]:
    return tuple(token(key, value) for key, value in settings_of(spec, keys).items())


def column(key: str) -> str:
    """A varied setting's column header in `make dry-run`."""
    return key.split(".")[-1]
