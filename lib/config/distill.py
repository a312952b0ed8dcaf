"""CONFIG_DISTILL* (lib/train/Kconfig) as TrainSettings fields; every problem one line. The matrix gives each pruned
run its teacher (lib/matrix/teachers.py); lib/train/distill.py uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib.core.errors import ConfigError


def read(r: Any) -> dict[str, Any]:
    """distill_weight (0: off), distill_temperature and distill_teacher (an absolute run folder, or "" for the
    same seed's dense run of this matrix)."""
    named = r.str("DISTILL_TEACHER_PATH").strip()  # visible always: naming one offers CONFIG_DISTILL without dense runs
    if not r.bool("DISTILL"):
        return {}
    weight = r.float("DISTILL_WEIGHT", 0.0, 1.0, open_low=True)
    temperature = r.float("DISTILL_TEMPERATURE", 0.0, open_low=True)
    teacher = ""
    if named:
        folder = Path(named).expanduser().resolve()
        if not (folder / "spec.json").is_file():
            raise ConfigError(f"CONFIG_DISTILL_TEACHER_PATH={named!r} is not a run folder (no spec.json); give "
                              f"results/<folder>/<run> of a finished dense run, or clear it to use this matrix's "
                              f"dense runs")
        teacher = str(folder)
    return {"distill_weight": weight, "distill_temperature": temperature, "distill_teacher": teacher}
