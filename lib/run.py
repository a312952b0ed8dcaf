"""Run one training run from its folder: ``python -m lib.run RUN_DIR``.

Reads RUN_DIR/spec.json (nothing else), trains, and always leaves
RUN_DIR/summary.json: status ok, diverged, or failed with the error text.
Exit status: 0 for ok or diverged (a recorded outcome), 1 for failed, 2 when
the folder is being trained by another process (its lock, lib/runlock.py), 3
when the disk is full (the matrix then stops every run), 4 when SIGTERM or
SIGUSR1 stopped it after a checkpoint (no summary: `make continue` resumes it).

Under torchrun (a plan of several processes, see lib/distributed.py) every rank
runs this; each joins the process group, only rank 0 writes summary.json and
prints, and every rank exits with the same status.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from lib import distributed, runlock
from lib.checkpoint import state as ckpt_state
from lib.errors import HarnessError
from lib.files import DiskFullError, is_disk_full, write_error, write_json_atomic
from lib.spec import RunSpec


def run(run_dir: Path) -> int:
    spec = RunSpec.read(run_dir / "spec.json")
    started = time.time()
    shard = distributed.from_env()
    if shard.main:  # one trainer per run folder; the OS lets go of the lock when this process dies
        runlock.lock_for_child(run_dir)
    disk_full = False
    ckpt_state.install_stop_handlers()  # SIGTERM/SIGUSR1: checkpoint at the end of the step, then stop
    try:
        shard = distributed.setup(spec.hardware)  # joins the process group when torchrun started several ranks
        from lib.trainer import train

        summary = train(spec, run_dir, shard)
    except ckpt_state.Stopped as stopped:  # not an outcome: `make continue` resumes from the checkpoint
        distributed.teardown()
        if shard.main:
            print(f"{spec.name}: {stopped}; `make continue` resumes it", flush=True)
        return STOPPED_EXIT
    except HarnessError as exc:
        disk_full = isinstance(exc, DiskFullError)
        summary = failed_summary(spec.name, str(exc))
    except Exception as exc:  # a crash in one run must not lose its record
        disk_full = is_disk_full(exc)
        if disk_full:  # a full disk is one line, not a traceback
            summary = failed_summary(spec.name, str(write_error(Path(exc.filename or run_dir), exc)))
        else:
            traceback.print_exc()
            summary = failed_summary(spec.name, f"{type(exc).__name__}: {exc}")
    finally:
        distributed.teardown()
    if not shard.main:  # the same outcome on every rank (losses and metrics are reduced); rank 0 records it
        if summary["status"] == "failed":  # a failure of this rank alone: torchrun may stop rank 0 first
            print(f"{RANK_FAILED.format(rank=shard.rank)}{summary['error']}", flush=True)
        return 1 if summary["status"] == "failed" else 0
    summary["spec"] = spec.to_dict()
    summary["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    try:
        write_json_atomic(run_dir / "summary.json", summary)
    except DiskFullError as exc:
        print(f"error: {exc}", flush=True)
        return DISK_FULL_EXIT
    print(f"{spec.name}: {summary['status']}" + (f" ({summary['error']})" if summary.get("error") else ""))
    if disk_full:
        return DISK_FULL_EXIT
    return 1 if summary["status"] == "failed" else 0


RANK_FAILED = "rank {rank} failed: "  # the line lib/matrix.py looks for in a log that has no summary
DISK_FULL_EXIT = 3  # the matrix stops every run on this status: its siblings would fill the same disk
STOPPED_EXIT = 4  # stopped on SIGTERM/SIGUSR1 after writing a checkpoint; unfinished, resumable


def failed_summary(name: str, error: str) -> dict:
    """The record of a run that did not finish."""
    return {"name": name, "status": "failed", "error": error, "flags": []}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lib.run RUN_DIR", file=sys.stderr)
        return 2
    try:
        return run(Path(argv[0]))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        _exit_disk_full(exc)


def _exit_disk_full(exc: OSError) -> None:
    """The log itself sits on the full disk: say so where possible, then exit without flushing it again."""
    try:
        print(f"error: {write_error(Path(exc.filename or '.'), exc)}", file=sys.stderr, flush=True)
    except OSError:
        pass
    os._exit(DISK_FULL_EXIT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
