"""`make rerun RUN=<run folder>`: train one run again from its spec.json alone, and say whether it came out the same.

The spec is read at whatever schema it was written in (lib/core/spec.py migrates it); a setting whose behaviour
has since been removed is named first, with what the rerun does instead. The rerun goes into a new results
folder (RESULTS_DIR honoured) and is judged on what a paper reports: the best validation metric and its
step, the test metric at that checkpoint, and the sparsity reached. Equal means equal to the bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lib import matrix
from lib.core.errors import HarnessError
from lib.core.spec import RunSpec, migrate


def rerun(run_dir: Path, results_dir: str, command: str, strict: bool = False, say: Any = print) -> int:
    """0 after the verdict (1 with ``strict`` when the rerun differs)."""
    original = _finished_summary(run_dir)
    try:
        data, notes = migrate(json.loads((run_dir / "spec.json").read_text()))
        spec = RunSpec.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
        raise HarnessError(f"{run_dir}/spec.json: not a spec this harness can read ({exc})") from None
    for note in notes:
        say(f"note: {spec.name}: {note}")
    config_text = (run_dir.parent / "config.txt").read_text() if (run_dir.parent / "config.txt").is_file() else ""
    folder = matrix.new_results_folder(results_dir, f"rerun_{spec.name}", [spec], command,
                                       f"# rerun of {run_dir.resolve()}/spec.json\n{config_text}")
    if (run_dir / "summary.json").is_file():
        shutil.copy(run_dir / "summary.json", folder / "original_summary.json")
    runs = matrix.run_folder(folder, jobs=1)
    again = next((r for r in runs if r.get("name") == spec.name), {"status": "missing"})
    differences = compare(original, again)
    if differences:
        say(f"{spec.name}: differs from {run_dir}: {'; '.join(differences)} (rerun in {folder})")
        return 1 if strict else 0
    say(f"{spec.name}: identical to {run_dir}: {verdict_values(again)} (rerun in {folder})")
    return 0


def _finished_summary(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / "spec.json").is_file():
        raise HarnessError(f"{run_dir}: not a run folder (no spec.json); give RUN=results/<folder>/<run> or "
                           f"RUN=key_results/<publication>/<run>")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise HarnessError(f"{run_dir} has no readable summary.json, so there is nothing to compare a rerun "
                           f"with; `make continue` finishes an unfinished run") from None
    if summary.get("status") not in ("ok", "diverged"):
        raise HarnessError(f"{run_dir} ended {summary.get('status')!r}, not ok: nothing to compare a rerun with")
    return summary


def _metric(summary: dict[str, Any]) -> str:
    return (summary.get("metric") or {}).get("name", "accuracy")


def _facts(summary: dict[str, Any]) -> dict[str, Any]:
    """What a rerun is judged on."""
    name = _metric(summary)
    best = summary.get("best") or {}
    return {"status": summary.get("status"),
            f"best val {name}": (best.get("val") or {}).get(name), "best step": best.get("step"),
            f"test {name} at best": (summary.get("test_at_best") or {}).get(name),
            "reached sparsity": (summary.get("sparsity") or {}).get("reached")}


def compare(original: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """One 'what: before -> now' per fact that differs (empty when identical to the bit)."""
    before, now = _facts(original), _facts(again)
    return [f"{key} {before[key]!r} -> {now[key]!r}" for key in before if before[key] != now.get(key)]


def verdict_values(summary: dict[str, Any]) -> str:
    facts = _facts(summary)
    name = _metric(summary)
    return (f"best val {name} {facts[f'best val {name}']} at step {facts['best step']}, test "
            f"{facts[f'test {name} at best']}, reached sparsity {facts['reached sparsity']}")
