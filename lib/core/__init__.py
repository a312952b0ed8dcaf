"""Shared contracts every other package builds on, importing nothing else of lib: errors, the registry
lookup, atomic files, the RunSpec, the task plug-in interface, removable structures, the run lock and
side-by-side timing, another interpreter's packages (pyenv) and a record's provenance."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: lib/core/ -> lib/ -> here
