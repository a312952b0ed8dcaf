"""The matrix's list axes (lib/matrix/Kconfig, "More axes") and its search: each list read and checked here.

A list, when set, replaces its single choice: SPARSITY_LIST the sparsity axis, <OPT>_LR_LIST that optimizer's
learning rate, IMPORTANCE_LIST / SCHEDULE_LIST / THRESHOLD_LIST the pruning settings of the methods that use
them. lib/matrix/cells.py turns them into cells and names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lib.core.errors import ConfigError
from lib.pruning import importance, schedule, sensitivity, threshold

SPARSITY_CHOICES = (50, 70, 90, 95, 99)  # CONFIG_SPARSITY_ENABLE_<pct>
OPTIMIZERS = ("sgd", "adam", "adamw", "adamwadv", "adamwspam", "adamwprune")
IMPORTANCES = tuple(name for name, kind in importance.IMPORTANCES.items() if not kind.one_shot)  # in order
SCHEDULES = tuple(schedule.CURVES)
THRESHOLDS = tuple(threshold.THRESHOLDS)
# Which pruning methods read each setting (lib/config/__init__.py's _prune reads them for the same methods).
USES = {"importance": ("magnitude", "structured", "layer-dropout", "nm"),
        "schedule": ("magnitude", "movement", "state", "structured", "layer-dropout", "nm"),
        "threshold": ("magnitude", "movement", "state", "nm"),
        "sparsity": ("magnitude", "movement", "state", "structured", "layer-dropout")}


@dataclass(frozen=True)
class Axes:
    """The list axes that are set (an empty tuple: not set) and the search over the grid."""

    sparsities: tuple[float, ...] = ()  # fractions
    lrs: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # optimizer -> learning rates
    importances: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()
    thresholds: tuple[str, ...] = ()
    search: str = "grid"  # or "random"
    search_runs: int = 0
    search_seed: int = 0

    def settings(self) -> dict[str, tuple[str, ...]]:
        """The pruning-setting lists that are set, by PruneSettings field."""
        return {name: values for name, values in (("importance", self.importances), ("schedule", self.schedules),
                                                  ("threshold", self.thresholds)) if values}


def read(r: Any, optimizers: tuple[str, ...], prunings: tuple[str, ...]) -> Axes:
    """Every list of lib/matrix/Kconfig's "More axes" menu, checked; one line for what is wrong."""
    lrs = {name: values for name in OPTIMIZERS if (values := _lr_list(r, name, optimizers))}
    axes = Axes(
        sparsities=_sparsity_list(r, prunings),
        lrs=lrs,
        importances=_names(r, "IMPORTANCE_LIST", IMPORTANCES, "importance", prunings),
        schedules=_names(r, "SCHEDULE_LIST", SCHEDULES, "schedule", prunings),
        thresholds=_names(r, "THRESHOLD_LIST", THRESHOLDS, "threshold", prunings),
        search=r.choice("MATRIX_SEARCH"),
    )
    if axes.search == "random":
        return Axes(**{**axes.__dict__, "search_runs": r.int("MATRIX_SEARCH_RUNS"),
                       "search_seed": r.int("MATRIX_SEARCH_SEED")})
    return axes


def sparsity_axis(r: Any, lists: Axes) -> tuple[float, ...]:
    """The target sparsities (fractions): SPARSITY_LIST when set, else the enabled choices or the single target
    (whose symbols are read either way)."""
    enabled = {pct: r.bool(f"SPARSITY_ENABLE_{pct}") for pct in SPARSITY_CHOICES}
    if r.bool("SPARSITY_MULTIPLE"):
        r.sym("TARGET_SPARSITY")
        chosen = tuple(pct / 100 for pct, on in enabled.items() if on)
    else:
        chosen = (r.float("TARGET_SPARSITY", 0.0, 1.0, open_low=True, open_high=True),)
    return lists.sparsities or chosen


def distribution(r: Any, models: tuple[str, ...], targets: tuple[float, ...]) -> dict[str, Any]:
    """CONFIG_SPARSITY_DISTRIBUTION as PruneSettings fields: hidden by Kconfig (so "global") where no method of the
    matrix uses it, its per-layer members offered only with the exact threshold, and ``sweep`` only once
    CONFIG_SPARSITY_DISTRIBUTION_FILE names a file, whose curves are read here (lib/pruning/sensitivity.py)."""
    kind = r.choice("SPARSITY_DISTRIBUTION") or "global"
    text = r.str("SPARSITY_DISTRIBUTION_FILE")  # visible with the choice; what it names is read for sweep only
    if kind == "owl":  # Kconfig offers it for GPT-2 alone, the model with calibration text
        return {"distribution": kind, "owl_m": r.float("OWL_M", 0.0, open_low=True),
                "owl_lambda": r.float("OWL_LAMBDA", 0.0, 0.5, open_high=True),
                "owl_batches": r.int("OWL_CALIBRATION_BATCHES")}
    if kind != "sweep":
        return {"distribution": kind}
    for model in models:  # a file measures one model: every model of the matrix must be it
        curves, source = sensitivity.read(text, model, [t for t in targets if t > 0])
    return {"distribution": kind, "layer_curves": curves, "layer_source": source}


def items(symbol: str, text: str, parse: Callable[[str], Any], example: str) -> tuple[Any, ...]:
    """The comma-separated values of list ``symbol`` ("" -> ()), each parsed; empty, malformed or repeated
    values are one line naming the value."""
    if not text.strip():
        return ()
    words = [w.strip() for w in text.split(",")]
    values = []
    for i, word in enumerate(words, 1):
        if not word:
            raise ConfigError(f"CONFIG_{symbol}={text!r}: value {i} is empty; separate values with single commas, "
                              f"e.g. {example!r}")
        value = parse(word)
        if value in values:
            raise ConfigError(f"CONFIG_{symbol}={text!r}: {word!r} is given twice; list each value once")
        values.append(value)
    return tuple(values)


def _number(symbol: str, text: str, example: str) -> Callable[[str], float]:
    def parse(word: str) -> float:
        try:
            value = float(word)
        except ValueError:
            raise ConfigError(f"CONFIG_{symbol}={text!r}: {word!r} is not a number; write e.g. {example!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"CONFIG_{symbol}={text!r}: {word!r} is not a finite number; write e.g. {example!r}")
        return value
    return parse


def _ignored(symbol: str, setting: str, prunings: tuple[str, ...]) -> None:
    if not set(USES[setting]) & set(prunings):
        raise ConfigError(f"CONFIG_{symbol} is set, but no pruning method of the matrix ({', '.join(prunings)}) uses "
                          f"a {setting}; clear it, or add a method that does ({', '.join(USES[setting])})")


def _sparsity_list(r: Any, prunings: tuple[str, ...]) -> tuple[float, ...]:
    symbol, text, example = "SPARSITY_LIST", r.str("SPARSITY_LIST"), "30,60,80,97.5"
    percents = items(symbol, text, _number(symbol, text, example), example)
    if not percents:
        return ()
    for value in percents:
        if not 0 < value < 100:
            raise ConfigError(f"CONFIG_{symbol}={text!r}: {value:g} is outside (0, 100); sparsities are percentages "
                              f"of the prunable weights, e.g. {example!r}")
    if all(value <= 1 for value in percents):
        raise ConfigError(f"CONFIG_{symbol}={text!r}: every value is at most 1, which looks like fractions; write "
                          f"percentages, e.g. {','.join(f'{v * 100:g}' for v in percents)!r}")
    _ignored(symbol, "sparsity", prunings)
    return tuple(value / 100 for value in percents)


def _lr_list(r: Any, name: str, optimizers: tuple[str, ...]) -> tuple[float, ...]:
    symbol = f"{name.upper()}_LR_LIST"
    text, example = r.str(symbol), "1e-3,3e-3"
    rates = items(symbol, text, _number(symbol, text, example), example)
    if not rates:
        return ()
    for value in rates:
        if not value > 0:
            raise ConfigError(f"CONFIG_{symbol}={text!r}: {value:g} is not a learning rate; each must be > 0")
    if name not in optimizers:
        raise ConfigError(f"CONFIG_{symbol} is set, but {name} is not an optimizer of the matrix "
                          f"({', '.join(optimizers)}); clear it, or enable {name}")
    return rates


def _names(r: Any, symbol: str, valid: tuple[str, ...], setting: str, prunings: tuple[str, ...]) -> tuple[str, ...]:
    text = r.str(symbol)

    def parse(word: str) -> str:
        if word not in valid:
            raise ConfigError(f"CONFIG_{symbol}={text!r}: {word!r} is not a {setting}; valid: {', '.join(valid)}")
        return word

    values = items(symbol, text, parse, ",".join(valid[:2]))
    if values:
        _ignored(symbol, setting, prunings)
    return values
