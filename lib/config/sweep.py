"""What `make sweep` tries (lib/sweep/oneshot.py): parsed from CONFIG_SWEEP_* or from SPARSITIES=, METRICS=,
PATTERNS=, CALIBRATION=, TOLERANCE=, QUANT= and LAYERS= on the command line, each problem one line."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lib.core.errors import ConfigError, number
from lib.core.spec import SweepSettings

PATTERNS = ("unstructured", "structured")  # and N:M, written as e.g. "2:4"


def sparsities(text: str, where: str) -> tuple[float, ...]:
    """``"30,50,70"`` (percent) -> (0.3, 0.5, 0.7), ascending and without repeats."""
    values = []
    for item in _items(text, where):
        value = number(item, f"{where}: {item!r} is not a number; give percentages, e.g. 30,50,70,90")
        if not 0 < value < 100:
            raise ConfigError(f"{where}: sparsity {item} % is outside (0, 100) %; give e.g. 30,50,70,90")
        if value < 1:
            raise ConfigError(f"{where}: sparsities are percentages; write {value * 100:g}, not {item}")
        values.append(value / 100)
    return tuple(sorted(set(values)))


def metrics(text: str, where: str) -> tuple[str, ...]:
    """Importance metric names of lib/pruning/importance.py's registry (``gradient_sensitivity`` or
    ``gradient-sensitivity``), and ``sparsegpt``."""
    from lib.pruning.importance import IMPORTANCES
    from lib.pruning.sparsegpt import NAME

    metrics = (*IMPORTANCES, NAME)
    found = []
    for item in _items(text, where):
        name = item.replace("_", "-")
        if name not in metrics:
            raise ConfigError(f"{where}: unknown importance metric {item!r}; valid: {', '.join(metrics)}")
        found.append(name)
    return tuple(dict.fromkeys(found))


def patterns(text: str, where: str) -> tuple[str, ...]:
    """``unstructured``, ``structured`` and N:M patterns such as ``2:4`` (1 <= N < M)."""
    from lib.pruning.nm import parse_pattern

    found = []
    for item in _items(text, where):
        if ":" in item:
            n, m = parse_pattern(item)
            item = f"{n}:{m}"
        elif item not in PATTERNS:
            raise ConfigError(f"{where}: unknown pattern {item!r}; valid: {', '.join(PATTERNS)} or N:M such as 2:4")
        found.append(item)
    return tuple(dict.fromkeys(found))


def count(text: str, where: str) -> int:
    if not text.strip().isdigit():
        raise ConfigError(f"{where}={text!r} is not a whole number of batches; give e.g. 8")
    return int(text)


def tolerance(text: str, where: str) -> float:
    value = number(text, f"{where}={text!r} is not a number; give e.g. 1 (points) or 5 (%)")
    if not value >= 0:
        raise ConfigError(f"{where}={text} is negative; give e.g. 1 (points) or 5 (%)")
    return value


def int8(text: str, where: str) -> bool:
    """QUANT=int8 (rows also after int8) or QUANT=none."""
    from lib.quant import QUANTS

    if text not in QUANTS:
        raise ConfigError(f"{where}={text!r} is not a quantization; choose one of {', '.join(QUANTS)}")
    return text == "int8"


def yes_no(text: str, where: str) -> bool:
    """LAYERS=y (also each layer pruned alone) or LAYERS=n."""
    if text not in ("y", "n"):
        raise ConfigError(f"{where}={text!r}: give y or n")
    return text == "y"


def overridden(settings: SweepSettings, given: dict[str, str | None], higher_is_better: bool) -> SweepSettings:
    """``settings`` with the command line's SPARSITIES=, METRICS=, PATTERNS=, CALIBRATION= and TOLERANCE=;
    TOLERANCE is points of accuracy or percent of perplexity, whichever the task's metric is."""
    parsers: dict[str, tuple[str, Callable]] = {
        "sparsities": ("SPARSITIES", sparsities), "metrics": ("METRICS", metrics),
        "patterns": ("PATTERNS", patterns), "calibration_batches": ("CALIBRATION", count), "int8": ("QUANT", int8),
        "layers": ("LAYERS", yes_no),
        ("tolerance_accuracy" if higher_is_better else "tolerance_perplexity"): ("TOLERANCE", tolerance)}
    changes = {field: parse(given[name], name) for field, (name, parse) in parsers.items() if given.get(name)}
    return dataclasses.replace(settings, **changes)


def _items(text: str, where: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{where} is empty; give a comma-separated list")
    return items
