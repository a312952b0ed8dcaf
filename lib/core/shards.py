"""Sharded tensors (FSDP2's DTensors, lib/train/sharding.py) seen from one rank: its local shard."""

from __future__ import annotations

from typing import Any


def local(tensor: Any) -> Any:
    """This rank's shard of a DTensor (a view: writes reach the parameter); any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (a sharded parameter, its gradient or optimizer state)."""
    return callable(getattr(tensor, "to_local", None))
