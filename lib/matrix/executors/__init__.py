"""Where the matrix's runs execute: one registry of executors behind one small interface.

An executor has a ``name`` and ``run(folder, names, jobs, record=True) -> bool``: start the named runs of
a results folder and return True when every one has ended here (the matrix then writes the summary), or
False when they were handed to a scheduler that runs them later (`make status` and `make report` read
what finished). Every executor runs the same ``lib.train.run`` in each run folder, so run folders, logs,
summary.json and the report are the same whatever ran them, and `make continue` can finish a folder
with another executor than the one that started it.

- ``local`` (lib/matrix/executors/local.py): processes on this machine, side by side, one GPU set per run.
- ``slurm`` (lib/matrix/executors/slurm.py): one Slurm job per run (or a job array) through submitit.
"""

from __future__ import annotations

from typing import Any

from lib.config.executor import ExecutorSettings
from lib.core.registry import lookup
from lib.matrix.executors.local import LocalExecutor


def _slurm(settings: ExecutorSettings, node_gpus: int | None) -> Any:
    from lib.matrix.executors.slurm import SlurmExecutor  # submitit is imported only when Slurm is used

    return SlurmExecutor(settings, node_gpus)


EXECUTORS = {"local": lambda settings, node_gpus: LocalExecutor(), "slurm": _slurm}


def build_executor(settings: ExecutorSettings, node_gpus: int | None = None) -> Any:
    """The executor ``settings.name`` (an unknown name lists the valid ones); ``node_gpus``: the GPUs of one
    compute node when GPUS= describes them."""
    factory = lookup(EXECUTORS, settings.name, "executor (CONFIG_EXECUTOR or EXECUTOR=)",
                     "lib/matrix/executors/__init__.py")
    return factory(settings, node_gpus)


__all__ = ["EXECUTORS", "ExecutorSettings", "LocalExecutor", "build_executor"]
