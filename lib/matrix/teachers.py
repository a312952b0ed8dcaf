"""CONFIG_DISTILL: each pruned run's teacher, decided when the matrix is expanded (lib/train/distill.py uses it).

A named teacher folder (CONFIG_DISTILL_TEACHER_PATH) teaches every pruned run and must hold the same model.
Otherwise a pruned run's teacher is the dense run (pruning "none") of the same model, seed and optimizer
settings in the same matrix, named in the run's spec (the results folder is known only when it runs), and
the dense runs move to the front so they train first. Dense runs never distil.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lib.core.errors import ConfigError
from lib.core.spec import RunSpec


def assign(specs: list[RunSpec]) -> list[RunSpec]:
    """``specs`` with their teachers (unchanged without CONFIG_DISTILL), dense runs first."""
    if not any(s.train.distill_weight for s in specs):
        return specs
    dense = {_key(s): s for s in specs if s.prune.method == "none"}
    out = []
    for spec in specs:
        if spec.prune.method == "none":
            out.append(_with(spec, distill_weight=0.0, distill_teacher=""))
        elif spec.train.distill_teacher:
            _check_named(spec)
            out.append(spec)
        elif (teacher := dense.get(_key(spec))) is not None:
            out.append(_with(spec, distill_teacher=teacher.name))
        else:
            raise ConfigError(f"CONFIG_DISTILL: {spec.name} has no dense run of the same model, seed and optimizer "
                              f"settings in this matrix to learn from; add pruning none to the matrix or name a "
                              f"teacher in CONFIG_DISTILL_TEACHER_PATH")
    return sorted(out, key=lambda s: s.prune.method != "none")  # stable: teachers first, each group in order


def _key(spec: RunSpec) -> tuple:
    return spec.model, spec.seed, spec.optim, json.dumps(spec.model_options, sort_keys=True, default=str)


def _with(spec: RunSpec, **changes: object) -> RunSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **changes))


def _check_named(spec: RunSpec) -> None:
    folder = Path(spec.train.distill_teacher)
    model = json.loads((folder / "spec.json").read_text()).get("model")
    if model != spec.model:
        raise ConfigError(f"CONFIG_DISTILL_TEACHER_PATH={str(folder)!r} trained {model!r}, but {spec.name} trains "
                          f"{spec.model!r}; a teacher must be the same model")
