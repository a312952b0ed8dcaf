"""`make status [RESULTS=dir]`: each run's state, whatever executed it; the one vocabulary every command uses.

ok / failed / diverged come from the run's summary.json. A run without one is running (a live trainer
holds its lock, or its Slurm job runs), queued (its job waits, or it has not started), stopped
(checkpointed on Ctrl-C, SIGTERM or a scheduler's preemption, or its job requeued: `make continue` or the
requeued job resumes it), cut
(made smaller by `make surgery`: `make continue` trains the smaller model on), or failed (it ran, and
left neither a record nor a checkpoint). summary.json and report.md (lib/matrix/__init__.py) and the totals at
the end of `make` / `make continue` name a run without a record with ``run_state``, as `make status` does.
"""

from __future__ import annotations

from pathlib import Path

from lib.checkpoint.folder import RunCheckpoints
from lib.core import runlock
from lib.matrix.executors.slurm import ENDED, job_id, job_states
from lib.matrix.records import failure_line
from lib.results import run_record

SLURM = {"PENDING": "queued", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
         "REQUEUED": "stopped", "REQUEUE_HOLD": "stopped", "REQUEUE_FED": "stopped",
         "PREEMPTED": "stopped", "SUSPENDED": "stopped", "RESIZING": "running", "STOPPED": "stopped"}


def states(folder: Path, names: list[str]) -> list[tuple[str, str, str]]:
    """(run, state, detail) for each of ``names`` in ``folder``."""
    ids = {name: job_id(folder / name) for name in names}
    slurm = job_states(list(ids.values()))
    return [(name, *_state(folder / name, ids[name], slurm)) for name in names]


def run_state(run_dir: Path) -> tuple[str, str]:
    """(state, detail) of one run, as `make status` names it (its Slurm job, if any, asked for)."""
    job = job_id(run_dir)
    return _state(run_dir, job, job_states([job]) if job else {})


def _state(run_dir: Path, job: str | None, slurm: dict[str, str]) -> tuple[str, str]:
    found = run_record(run_dir)
    if found.record is not None:
        return str(found.record["status"]), (found.record.get("error") or "")[:100]
    if not found.missing:  # a record that cannot be used is never taken for a run that did not finish
        return "unreadable", f"summary.json {found.problem}"[:100]
    where = f"Slurm job {job}" if job else "local"
    if (run_dir / "summary.before_surgery.json").exists() and not (job and job in slurm):
        if _busy(run_dir):
            return "running", f"{where}, trainer pid {runlock.holder(run_dir)}, on the model surgery cut"
        return "cut", "made smaller by `make surgery`; `make continue` trains the smaller model on"
    if job and job in slurm:
        state = slurm[job]
        resumable = RunCheckpoints(run_dir).resumable()
        if state in ENDED:
            if resumable:
                return "stopped", f"{where} ended {state} after a checkpoint; `make continue` resumes it"
            return "failed", f"{where} ended {state} without a record"
        if state == "PENDING" and resumable:  # requeued after a warning signal: it resumes from its checkpoint
            return "stopped", f"{where} requeued, resumes from its checkpoint"
        return SLURM.get(state, state.lower()), f"{where} {state}"
    if _busy(run_dir):
        return "running", f"{where}, trainer pid {runlock.holder(run_dir)}"
    if RunCheckpoints(run_dir).resumable():
        return "stopped", f"{where}: stopped after a checkpoint; `make continue` resumes it"
    if (run_dir / "log.txt").is_file() and (run_dir / "log.txt").stat().st_size:
        return "failed", f"{where}: ended without a record or a checkpoint: {failure_line(run_dir / 'log.txt')}"
    return "queued", f"{where}: not started"


def _busy(run_dir: Path) -> bool:
    try:
        runlock.check_free(run_dir, grace_s=0.0)
    except runlock.RunBusyError:
        return True
    return False


def table(folder: Path, names: list[str]) -> str:
    rows = states(folder, names)
    width = max((len(name) for name, _, _ in rows), default=3)
    counts: dict[str, int] = {}
    lines = []
    for name, state, detail in rows:
        counts[state] = counts.get(state, 0) + 1
        lines.append(f"{name.ljust(width)}  {state:<9}  {detail}".rstrip())
    return "\n".join([f"{folder}:"] + lines + [", ".join(f"{n} {s}" for s, n in sorted(counts.items()))])
