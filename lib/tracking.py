"""Experiment tracking behind one small interface (only "none" so far; wandb and trackio come later).

A tracker receives each evaluation record; rank 0 only. A tracker failure must
never stop a run, so every call is guarded.
"""

from __future__ import annotations

from typing import Any

from lib.registry import lookup


class NullTracker:
    """Tracks nothing: the run folder's metrics.jsonl and summary.json are the record."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


TRACKERS = {"none": NullTracker}


def open_tracker(name: str, run_name: str) -> NullTracker:
    """The tracker called ``name`` for run ``run_name``; an unknown name lists the valid ones."""
    return lookup(TRACKERS, name, "tracker", "lib/tracking.py")()
