"""What a Slurm job runs (lib/matrix/executors/slurm.py): one run of the matrix, and its requeue on a warning.

submitit pickles a ``RunJob`` and calls it inside the job. It starts the same command the local executor
starts (lib.train.run, or torchrun for a DDP plan) with the run's log appended. When the job is preempted or
reaches its time limit, Slurm sends SIGUSR1 to the job's processes: lib.train.run finishes its step, writes a
checkpoint and exits (status 4), and submitit calls ``checkpoint()``, which waits for that and hands back
a fresh ``RunJob`` of the same folder; submitit requeues the job, and the requeued job resumes from the
checkpoint exactly as `make continue` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from lib.core import ROOT
from lib.core.pyenv import pythonpath_with

STOP_WAIT_S = 600  # at most: lib.train.run finishes the step in progress, then writes the checkpoint


class RunJob:
    """A picklable call that trains one run folder to its end (or to its next checkpoint on a warning)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir}  # the child process belongs to one job only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.run_dir, self._proc = state["run_dir"], None

    def __call__(self) -> int:
        from lib.train import distributed

        run_dir = Path(self.run_dir)
        command = distributed.run_command(run_dir)
        env = {**os.environ, "PYTHONPATH": pythonpath_with(ROOT, os.environ), "PYTHONUNBUFFERED": "1"}
        (run_dir / "summary.json").unlink(missing_ok=True)
        with (run_dir / "log.txt").open("a") as log:
            log.write(f"[slurm job {os.environ.get('SLURM_JOB_ID', '?')} on {os.uname().nodename}]\n")
            log.flush()
            self._proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
            # Polled, not wait(): a blocking wait() holds the process's lock, and the warning signal's handler
            # (checkpoint(), below) must wait for the same process.
            while (code := self._proc.poll()) is None:
                time.sleep(0.2)
            return code

    def checkpoint(self) -> Any:
        """On the warning signal: let the run write its checkpoint and stop, then be requeued as new."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)  # it may have had one from Slurm already; a second is harmless
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        return DelayedSubmission(RunJob(self.run_dir))
