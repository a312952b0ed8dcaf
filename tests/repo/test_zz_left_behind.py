"""Run last (marker ``last``): the suite leaves no process of its own running.

`make test` runs this file on its own after the passes that spread the other files over several workers
(pytest-xdist), with the session mark they all carried; inside a spread pass it would see the other workers'
processes, so it skips there.

Every process a test starts inherits conftest's session mark in its environment. One that still carries
it after every other test, and is not pytest or a child pytest still holds (it ends with pytest), was
left behind: a daemon, a training child that escaped its process group, a Slurm cluster started by a test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import SESSION_MARK


def marked_processes(mark: str) -> dict[int, str]:
    """{pid: command line} of the processes whose environment carries ``SESSION_MARK=mark``."""
    wanted = f"{SESSION_MARK}={mark}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if wanted in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def held_by(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if parent is not None:
            children.setdefault(parent, []).append(int(proc.name))
    held, todo = set(), [pid]
    while todo:
        held.add(todo[-1])
        todo.extend(children.get(todo.pop(), []))
    return held


def left_behind() -> dict[int, str]:
    mine = held_by(os.getpid())
    return {pid: line for pid, line in marked_processes(os.environ[SESSION_MARK]).items() if pid not in mine}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_finder_sees_a_process_that_outlives_its_parent(tmp_path: Path) -> None:
    """The check below can fail: a grandchild whose parent exited is found, and gone once killed."""
    import signal
    import subprocess

    pid_file = tmp_path / "pid"
    subprocess.run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}"], check=True, timeout=30)
    pid = int(pid_file.read_text())
    try:
        assert pid in left_behind()
    finally:
        os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if pid not in left_behind():
            break
        time.sleep(0.1)
    assert pid not in left_behind()


@pytest.mark.last
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
@pytest.mark.skipif(bool(os.environ.get("PYTEST_XDIST_WORKER")), reason="the other workers are still running: "
                    "run this file on its own afterwards, as make test does")
def test_the_suite_left_no_process_of_its_own_running() -> None:
    found = left_behind()
    for _ in range(50):  # a process killed a moment ago may still be exiting
        if not found:
            break
        time.sleep(0.1)
        found = left_behind()
    assert not found, "processes started by the suite are still running: " + "; ".join(
        f"{pid}: {line[:120]}" for pid, line in sorted(found.items()))
