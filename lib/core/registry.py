"""One lookup for every registry (optimizers, pruners, tasks, trackers, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from lib.core.errors import ConfigError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str, where: str) -> T:
    """registry[name], or a one-line ConfigError listing the valid names and where new ones are registered."""
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {what} {name!r}; valid: {valid} (new ones are registered in {where})") from None
