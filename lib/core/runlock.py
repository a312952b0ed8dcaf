"""One trainer per run folder, and no trainer outliving the matrix that started it.

A run folder is locked with an OS file lock (flock on <run dir>/train.lock)
held by the process training it. The kernel releases the lock when that
process dies, however it dies, so a SIGKILLed run never leaves a stale lock;
the file's text (the holder's PID) is only there to name the holder.

The matrix takes the lock before it starts a run and hands the open file to
the child (its PID replaces the matrix's in the file), so there is no moment
when a second `make continue` could slip in. A run started by hand
(`python -m lib.train.run DIR`) takes the lock itself. Children are started with a
parent-death signal, so killing the matrix's driver stops its runs too.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import time
from pathlib import Path

from lib.core.errors import HarnessError

LOCK_NAME = "train.lock"
FD_ENV = "HARNESS_RUN_LOCK_FD"  # set by the matrix: the child inherited the folder's lock on this fd
_PR_SET_PDEATHSIG = 1


class RunBusyError(HarnessError):
    """The run folder is locked by another live process."""


def try_lock(run_dir: Path) -> int | None:
    """The fd of the folder's lock, now held by this process; None if another process holds it."""
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def record_holder(fd: int, pid: int) -> None:
    """Name ``pid`` as the lock's holder in the lock file (the lock itself is the fd's)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)


def holder(run_dir: Path) -> str:
    """The PID named in the folder's lock file ("unknown" if unreadable)."""
    try:
        return (Path(run_dir) / LOCK_NAME).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def busy_error(run_dir: Path) -> RunBusyError:
    pid = holder(run_dir)
    return RunBusyError(f"{run_dir} is being trained by PID {pid}; wait for it to finish, or stop it "
                        f"(kill {pid}) and then run `make continue`")


def lock(run_dir: Path) -> int:
    """Take the folder's lock for this process and name it the holder; RunBusyError if it is held."""
    fd = try_lock(run_dir)
    if fd is None:
        raise busy_error(run_dir)
    record_holder(fd, os.getpid())
    return fd


def check_free(run_dir: Path, grace_s: float = 2.0) -> None:
    """RunBusyError when a live process holds the folder's lock; otherwise nothing (the lock is let go).

    A holder that was killed a moment ago may take a little while to let go: wait up to ``grace_s``.
    """
    if not (Path(run_dir) / LOCK_NAME).exists():
        return
    deadline = time.monotonic() + grace_s
    while (fd := try_lock(run_dir)) is None:
        if time.monotonic() >= deadline:
            raise busy_error(run_dir)
        time.sleep(0.05)
    os.close(fd)


def lock_for_child(run_dir: Path) -> int:
    """lib.train.run's lock: the one the matrix handed down (FD_ENV), else taken here. Returns the fd or -1."""
    inherited = os.environ.get(FD_ENV)
    if inherited:  # the launcher holds it for this process tree (torchrun's workers see the variable too)
        return int(inherited)
    return lock(run_dir)


_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int) -> None:
    """In a child before exec: get SIGTERM when the parent dies (Linux), or exit if it already has."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
