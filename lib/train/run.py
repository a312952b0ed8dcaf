"""Run one training run from its folder: ``python -m lib.train.run RUN_DIR``.

Reads RUN_DIR/spec.json (nothing else), trains, and always leaves
RUN_DIR/summary.json: status ok, diverged, or failed with the error text.
Exit status: 0 for ok or diverged (a recorded outcome), 1 for failed, 2 when
the folder is being trained by another process (its lock, lib/core/runlock.py), 3
when the disk is full (the matrix then stops every run), 4 when SIGTERM or
SIGUSR1 stopped it after a checkpoint (no summary: `make continue` resumes it).

Under torchrun (a plan of several processes, see lib/train/distributed.py) every rank
runs this; each joins the process group, only rank 0 writes summary.json and
prints, and every rank exits with the same status.
"""

from __future__ import annotations

import signal

# torchrun stops every rank with SIGTERM when one exits: a rank 0 still importing torch would die
# unrecorded (seen on a loaded 2-core CI box). Until the real handlers go in, only remember the signal
# (as a program only: importing this module must not change the importer's signals).
_EARLY_STOP: list[int] = []
if __name__ == "__main__":
    for _early in (signal.SIGTERM, signal.SIGUSR1):  # SIGUSR1: a Slurm job's warning before preemption
        signal.signal(_early, lambda signum, frame: _EARLY_STOP.append(signum))

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from lib.checkpoint import state as ckpt_state  # noqa: E402
from lib.core import provenance, runlock  # noqa: E402
from lib.core.errors import HarnessError  # noqa: E402
from lib.core.files import DiskFullError, is_disk_full, write_error, write_json_atomic  # noqa: E402
from lib.core.spec import RunSpec  # noqa: E402
from lib.train import distributed  # noqa: E402


def run(run_dir: Path) -> int:
    spec = RunSpec.read(run_dir / "spec.json")
    if spec.train.deterministic:  # cuBLAS reads it when CUDA first makes a handle, so before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    started = time.time()
    shard = distributed.from_env()
    if shard.main:  # one trainer per run folder; the OS lets go of the lock when this process dies
        runlock.lock_for_child(run_dir)
    disk_full = False
    ckpt_state.install_stop_handlers()  # SIGTERM/SIGUSR1: checkpoint at the end of the step, then stop
    for signum in _EARLY_STOP:
        ckpt_state.request_stop(signum)
    joined = False
    try:
        shard = distributed.setup(spec.hardware)  # joins the process group when torchrun started several ranks
        joined = True
        summary = _train_and_cut(spec, run_dir, shard)
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
            if not joined:  # every rank fails setup alike: give rank 0 the time to record it
                _wait_for_record(run_dir / "summary.json", started)
        return 1 if summary["status"] == "failed" else 0
    summary["spec"] = spec.to_dict()
    summary["provenance"] = provenance.record(spec, shard.world_size)  # code, software, machine, data
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


CUBLAS_DETERMINISTIC = ":4096:8"  # the workspace strict deterministic mode needs on CUDA (torch's randomness notes)
RANK_FAILED = "rank {rank} failed: "  # the line lib/matrix/__init__.py looks for in a log that has no summary
DISK_FULL_EXIT = 3  # the matrix stops every run on this status: its siblings would fill the same disk
STOPPED_EXIT = 4  # stopped on SIGTERM/SIGUSR1 after writing a checkpoint; unfinished, resumable


def _train_and_cut(spec: RunSpec, run_dir: Path, shard: distributed.Shard) -> dict:
    """Train; with CONFIG_SURGERY_EVERY, cut each checkpoint the trainer stops at and train on from it."""
    from lib.train.trainer import train

    after_surgery = False
    while True:
        try:
            return train(spec, run_dir, shard, after_surgery)
        except ckpt_state.SurgeryDue as due:
            with distributed.main_first(shard):  # rank 0 cuts; the others wait, then load what it wrote
                if shard.main:
                    _cut(spec, run_dir, due.step)
            after_surgery = True


def _cut(spec: RunSpec, run_dir: Path, step: int) -> None:
    from lib.surgery.command import operate

    try:
        operate(run_dir, locked=True)
    except HarnessError as exc:  # refused or rolled back: the checkpoint is untouched, training goes on
        print(f"{spec.name}: no cut at step {step}: {exc}; training goes on uncut", flush=True)


def _wait_for_record(path: Path, since: float, patience_s: float = 20.0) -> None:
    """Wait (bounded) until rank 0 has written ``path`` after ``since``; torchrun stops it once this rank exits."""
    deadline = time.time() + patience_s
    while time.time() < deadline:
        if path.exists() and path.stat().st_mtime >= since - 1:
            return
        time.sleep(0.1)


def failed_summary(name: str, error: str) -> dict:
    """The record of a run that did not finish."""
    return {"name": name, "status": "failed", "error": error, "flags": []}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lib.train.run RUN_DIR", file=sys.stderr)
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
