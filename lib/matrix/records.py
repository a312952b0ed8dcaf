"""A run's outcome as the matrix records it, whatever executed it: its summary.json, or a failed record
made from its log when it left none (lib/matrix/__init__.py, lib/matrix/executors/)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lib.core.files import free_space, write_json_atomic
from lib.results import run_record
from lib.train.run import RANK_FAILED, failed_summary


def read_summary(run_dir: Path, exit_code: int | None = None) -> dict[str, Any]:
    """A run's summary.json; a crashed run that left none gets a failed record with its log's tail
    (written to its folder when ``exit_code`` says the process has ended)."""
    found = run_record(run_dir)
    if found.record is not None:
        return found.record
    reason = f"exited with status {exit_code}" if exit_code is not None else "did not finish"
    summary = failed_summary(run_dir.name, f"{reason}: {failure_line(run_dir / 'log.txt')}")
    if exit_code is not None:
        write_json_atomic(run_dir / "summary.json", summary)  # DiskFullError on a full disk: the matrix stops
    return summary


def failure_line(log: Path) -> str:
    """Why a run left no summary: the first rank's own failure line (torchrun's report follows it), else
    the log's last line."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    ranks = [line for line in lines if re.match(RANK_FAILED.format(rank=r"\d+"), line)]
    return (ranks or lines[-1:] or ["no output"])[0]


def disk_full_line(run_dir: Path) -> str:
    """The run's own disk-full line from its log, else one made here."""
    own = re.search(r"disk full .*? to finish", failure_line(run_dir / "log.txt"))
    if own:
        return own.group(0)
    return (f"disk full while {run_dir.name} ran ({free_space(run_dir)} free in {run_dir.parent}); "
            f"free some space, then run `make continue` to finish")


def one_line(s: dict[str, Any]) -> str:
    """The line printed when a run ends."""
    if s["status"] != "ok":
        return f"{s['name']}: {s['status'].upper()}  {s.get('error') or ''}".rstrip()
    metric = s["metric"]["name"]
    best = f"val {metric} {s['best']['val'][metric]:.2f}" if s.get("best") else "no eligible checkpoint"
    test = f"test {s['test_at_best'][metric]:.2f}" if s.get("test_at_best") else ""
    sp = s["sparsity"]
    flags = f"  [{', '.join(s['flags'])}]" if s.get("flags") else ""
    return f"{s['name']}: ok  {best}  {test}  sparsity {sp['reached']:.1%} (target {sp['target'] * 100:g}%){flags}"
