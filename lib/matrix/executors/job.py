"""What a Slurm job runs (lib/matrix/executors/slurm.py): one run of the matrix, and its requeue on a warning.

submitit pickles a ``RunJob`` and calls it inside the job. It starts the same command the local executor
starts (lib.train.run, or torchrun for a DDP plan) with the run's log appended. A job of several tasks (a
multi-rank plan: one task per rank, on one node or several) runs lib.train.run in each task as one rank, with
the rendezvous Slurm's environment gives (``rank_environment``). When the job is preempted or
reaches its time limit, Slurm sends SIGUSR1 to the job's processes: lib.train.run finishes its step, writes a
checkpoint and exits (status 4), and submitit calls ``checkpoint()``, which waits for that and hands back
a fresh ``RunJob`` of the same folder; submitit requeues the job, and the requeued job resumes from the
checkpoint exactly as `make continue` would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from lib.core import ROOT
from lib.core.pyenv import pythonpath_with

STOP_WAIT_S = 600  # at most: lib.train.run finishes the step in progress, then writes the checkpoint


def rank_environment() -> dict[str, str]:
    """In a Slurm job of several tasks, this task's rank variables for torch.distributed (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR: the job's first node, MASTER_PORT: from the job id); {} in a
    job of one task."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    from submitit import JobEnvironment

    job = JobEnvironment()
    job_number = int(re.sub(r"\D", "", str(job.job_id))[-6:] or 0)
    return {"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes), "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": str(20000 + job_number % 20000)}


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
        env = {**os.environ, "PYTHONPATH": pythonpath_with(ROOT, os.environ), "PYTHONUNBUFFERED": "1"}
        ranks = rank_environment()
        if ranks:  # one Slurm task per rank: this task is one, with Slurm's rendezvous (no torchrun)
            command = distributed.single_process_command(run_dir)
            env.update(ranks)
        else:
            command = distributed.run_command(run_dir)
        first = ranks.get("RANK", "0") == "0"
        if first:
            (run_dir / "summary.json").unlink(missing_ok=True)
        with (run_dir / "log.txt").open("a") as log:
            if first:
                log.write(f"[slurm job {os.environ.get('SLURM_JOB_ID', '?')} on {os.uname().nodename}"
                          f"{' x ' + ranks['WORLD_SIZE'] + ' tasks' if ranks else ''}]\n")
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
