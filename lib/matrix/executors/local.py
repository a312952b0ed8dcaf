"""The local executor: the matrix's runs as processes on this machine, ``jobs`` side by side.

Each run is ``python -m lib.train.run <run dir>``, or torchrun when its plan has several processes
(lib/train/distributed.py). On a machine with GPUs each run gets its own: a single-GPU run one device, a
DDP run as many as its plan's ranks per node, by CUDA_VISIBLE_DEVICES, and a run waits until that many
are free. CPU runs share the cores as their plan divided them (threads per rank).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lib.core import ROOT, runlock
from lib.core.errors import HarnessError, Interrupted
from lib.core.files import DiskFullError, write_error
from lib.core.pyenv import pythonpath_with
from lib.core.spec import RunSpec
from lib.matrix.records import disk_full_line, one_line, read_summary
from lib.train import distributed
from lib.train.run import DISK_FULL_EXIT, STOPPED_EXIT

STOP_WAIT_S = 120  # a stopped run finishes its step and writes a checkpoint; killed only after this


class GpuSlots:
    """Which GPUs of this machine are free; a run takes the devices its plan needs."""

    def __init__(self, ids: list[str]):
        self.free = list(ids)
        self.total = len(ids)

    @classmethod
    def here(cls) -> GpuSlots:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return cls([d for d in visible.split(",") if d.strip()])
        import torch

        return cls([str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])

    def take(self, count: int) -> list[str] | None:
        """``count`` free devices (all of them, for a plan wanting more than exist: the run says why it
        cannot start), or None while too few are free."""
        count = min(count, self.total)
        if count > len(self.free):
            return None
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def give(self, ids: list[str]) -> None:
        self.free += ids


def gpus_needed(run_dir: Path) -> int:
    """GPUs a run's plan uses on one machine (0 for a CPU plan or an unreadable spec)."""
    try:
        hw = RunSpec.read(run_dir / "spec.json").hardware
    except HarnessError:
        return 0
    return hw.nproc_per_node if hw.device.startswith("cuda") else 0


class LocalExecutor:
    """Runs side by side on this machine; returns when all have ended."""

    name = "local"

    def run(self, folder: Path, names: list[str], jobs: int, record: bool = True) -> bool:
        """Run ``names`` of ``folder``, ``jobs`` at a time; True when every run has ended here. Ctrl-C or SIGTERM
        stops every run after a checkpoint (Interrupted), a full disk stops them too; none is recorded as failed
        for it."""
        slots = GpuSlots.here() if any(gpus_needed(folder / n) for n in names) else GpuSlots([])
        running: list[tuple[str, subprocess.Popen, float, list[str]]] = []
        bar = tqdm(total=len(names), unit="run", disable=None, leave=False)
        queue = list(names)
        previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
        interrupted = False
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    devices = slots.take(gpus_needed(folder / queue[0]))
                    if devices is None:
                        break  # the next run waits for GPUs
                    name = queue.pop(0)
                    running.append((name, _launch(folder / name, devices), time.time(), devices))
                running = _reap(folder, running, bar, slots, record)
                time.sleep(0.05)
        except KeyboardInterrupt as exc:
            interrupted = True  # the signals stay ignored: the summary is written next, undisturbed
            bar.close()
            print(f"{exc or 'interrupted'}: stopping {len(running)} run(s), each after a checkpoint at the end of "
                  f"its step", flush=True)
            _stop(running)
            raise Interrupted(str(exc) or "interrupted", _stopped(folder, running, record), len(queue)) from None
        except DiskFullError:
            _stop(running)
            raise
        finally:
            if not interrupted:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            bar.close()
        return True


def _launch(run_dir: Path, devices: list[str]) -> subprocess.Popen:
    """Start one run: lib.train.run itself, or under torchrun when its plan has several processes.

    The run folder's lock is taken here and handed to the child, which holds it until it exits; the child
    gets SIGTERM if this driver dies, so no trainer outlives the matrix that started it.
    """
    command = distributed.run_command(run_dir)
    lock = runlock.lock(run_dir)
    try:
        env = {**os.environ, "PYTHONPATH": pythonpath_with(ROOT, os.environ), "PYTHONUNBUFFERED": "1",
               runlock.FD_ENV: str(lock)}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        (run_dir / "summary.json").unlink(missing_ok=True)
        driver = os.getpid()
        with (run_dir / "log.txt").open("a") as log:  # a resumed run adds to its earlier log
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, pass_fds=(lock,),
                                    preexec_fn=lambda: _child_setup(driver))
        runlock.record_holder(lock, proc.pid)
    except OSError as exc:
        raise write_error(run_dir / "log.txt", exc) from None
    finally:
        os.close(lock)  # the child's copy keeps the lock until the child exits
    return proc


def _child_setup(driver: int) -> None:
    """In the child before exec: SIGTERM when the driver dies, and Ctrl-C left to the driver, which stops each
    run with SIGTERM (a checkpoint) rather than a KeyboardInterrupt mid-step."""
    runlock.die_with_parent(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _reap(folder: Path, running: list, bar: tqdm, slots: GpuSlots, record: bool = True) -> list:
    """The runs still running; each finished one is recorded and printed. DiskFullError stops the matrix."""
    still = []
    for name, proc, started, devices in running:
        if proc.poll() is None:
            still.append((name, proc, started, devices))
            continue
        slots.give(devices)
        bar.update(1)
        if proc.returncode == DISK_FULL_EXIT:
            _stop([entry for entry in running if entry[1] is not proc and entry[1].poll() is None])
            raise DiskFullError(disk_full_line(folder / name))
        if proc.returncode == STOPPED_EXIT:  # checkpointed on SIGTERM/SIGUSR1: unfinished, not failed
            tqdm.write(f"{name}: stopped after a checkpoint; `make continue` resumes it")
            continue
        if not record:  # a worker node: rank 0, on node 0, writes the run's summary
            tqdm.write(f"{name}: exited with status {proc.returncode} (worker node)")
            continue
        summary = read_summary(folder / name, exit_code=proc.returncode)
        tqdm.write(f"{one_line(summary)}  [{time.time() - started:.1f} s from launch to exit]")
    return still


def _stopped(folder: Path, running: list, record: bool) -> int:
    """After a stop: say what became of each run; the number that checkpointed. A run that finished meanwhile
    is recorded; one the signal ended before it could checkpoint is left unrecorded, never failed (`make
    continue` starts it again, from an earlier checkpoint if it has one)."""
    checkpointed = 0
    for name, proc, *_ in running:
        if proc.returncode == STOPPED_EXIT:
            checkpointed += 1
            print(f"{name}: stopped after a checkpoint; `make continue` resumes it", flush=True)
        elif proc.returncode == 0 and record:
            print(one_line(read_summary(folder / name, exit_code=0)), flush=True)
        else:
            print(f"{name}: stopped before it could write a checkpoint (exit status {proc.returncode}); `make "
                  f"continue` starts it again", flush=True)
    return checkpointed


def _interrupt(signum: int, frame: Any) -> None:
    """The first SIGTERM or Ctrl-C stops the matrix; later ones (make forwards SIGTERM to its child, a
    terminal sends Ctrl-C to the whole group) are ignored while the runs checkpoint."""
    for ignored in (signal.SIGTERM, signal.SIGINT):
        signal.signal(ignored, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop(running: list) -> None:
    """Terminate the running runs and wait for them; they are left unfinished for `make continue`."""
    for _, proc, *_ in running:
        proc.terminate()
    for _, proc, *_ in running:
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
