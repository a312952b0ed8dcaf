"""Results you can trust (issue 10): no downgraded result, no wrong folder, one trainer per run folder.

Each test here failed before the change it guards:
- a damaged per-run summary.json made `make report` overwrite the only intact copy of a finished result;
- RESULTS_DIR was ignored by report/graphs/compare/publish, and "newest" followed modification times;
- a second `make continue` started a second trainer on a run folder, and killing the driver left its runs.
Disk-full behaviour is in tests/checkpoint/test_disk_full.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib import cli, matrix
from lib.core import runlock
from lib.core.errors import HarnessError
from tests.conftest import PY, ROOT, resolve_defconfig, tiny_spec
from tests.results.synthetic_results import build

FIRST, SECOND = "lenet5_adamw_none_0_s1", "lenet5_adamw_none_0_s2"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "lib.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def _records(folder: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((folder / "summary.json").read_text())["runs"]}


def test_report_keeps_the_last_good_record_of_a_damaged_run(tmp_path):
    folder = build(tmp_path / "acc_20250101_000000")
    good = _records(folder)[FIRST]
    path = folder / FIRST / "summary.json"
    path.write_text(path.read_text()[:120])  # truncated, as a full disk or a kill mid-copy leaves it
    result = _cli("report", "--results", str(folder))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert FIRST in result.stderr and "truncated" in result.stderr
    kept = _records(folder)[FIRST]
    assert kept["status"] == "unreadable" and kept["recorded_status"] == "ok"
    assert kept["test_at_best"] == good["test_at_best"] and kept["best"] == good["best"]  # nothing lost
    _cli("report", "--results", str(folder))  # a second pass keeps it too
    assert _records(folder)[FIRST]["test_at_best"] == good["test_at_best"]
    assert "| unreadable |" in (folder / "report.md").read_text()


@pytest.mark.parametrize("field", [("best", "val", "accuracy"), ("test_at_best", "accuracy"),
                                   ("sparsity", "reached"), ("metric", "higher_is_better")])
def test_a_wrong_type_deep_in_a_record_makes_the_run_unreadable_and_keeps_the_last_good_one(tmp_path, field):
    from lib.matrix.executors.status import run_state

    folder = build(tmp_path / "acc_20250101_000000")
    good = _records(folder)[FIRST]
    data = json.loads((folder / FIRST / "summary.json").read_text())
    inner = data
    for key in field[:-1]:
        inner = inner[key]
    inner[field[-1]] = "x"
    (folder / FIRST / "summary.json").write_text(json.dumps(data))
    assert run_state(folder / FIRST)[0] == "unreadable"  # make status
    records = matrix.write_summary(folder)
    kept = {r["name"]: r for r in records}[FIRST]
    assert kept["status"] == "unreadable" and kept["recorded_status"] == "ok"
    assert kept["best"] == good["best"] and kept["test_at_best"] == good["test_at_best"]  # not "x"
    assert f"field {'.'.join(field)!r} is 'x', expected" in kept["error"]
    assert '"x"' not in (folder / "summary.json").read_text()


def test_wrong_types_are_one_line_and_the_rest_still_renders(tmp_path):
    folder = build(tmp_path / "acc_20250101_000000")
    (folder / "summary.json").unlink()  # no earlier record to fall back on
    data = json.loads((folder / SECOND / "summary.json").read_text())
    data.update(sparsity="high", wall_time_s="long")
    (folder / SECOND / "summary.json").write_text(json.dumps(data))
    result = _cli("report", "--results", str(folder))
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and SECOND in lines[0] and "field 'sparsity' is 'high', expected an object" in lines[0]
    report = (folder / "report.md").read_text()
    assert f"| {SECOND} | unreadable |" in report
    assert f"| {FIRST} | ok |" in report and "98.00" in report  # the other runs are all there


@pytest.mark.parametrize("bad", [[1, 2], {"status": "ok", "memory": {"peak_rss_bytes": "big"}}, {"status": "done"}])
def test_bad_entries_of_the_folder_summary_are_unreadable_runs(tmp_path, bad):
    from lib.results.report import render

    folder = build(tmp_path / "acc_20250101_000000")
    data = json.loads((folder / "summary.json").read_text())
    data["runs"][0] = bad if not isinstance(bad, dict) else {**data["runs"][0], **bad}
    (folder / "summary.json").write_text(json.dumps(data))
    text = render(folder)
    assert "unreadable" in text and f"| {SECOND} | ok |" in text


def _cli_read_only(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m lib.cli args`` with ``folder`` read-only: a read-only bind mount in a private mount namespace
    as root (whom permission bits do not stop), write permission taken away otherwise."""
    command = [PY, "-m", "lib.cli", *args]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        try:
            for path, mode in modes.items():
                path.chmod(mode & ~0o222)
            return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    if not shutil.which("unshare"):
        pytest.skip("as root, a read-only folder needs unshare (util-linux) for a private read-only mount")
    script = 'mount -o bind,ro "$0" "$0" || exit 99; exec "$@"'
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(folder), *command],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode == 99:
        pytest.skip(f"this machine refuses a private read-only mount: {done.stderr.strip()}")
    return done


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["report", "graphs", "export", "continue", "sweep"])
def test_a_read_only_results_folder_is_one_line_and_left_as_it_was(tmp_path, command):
    folder = build(tmp_path / "acc_20250101_000000")
    before = _snapshot(folder)
    where = {"export": ["--run", str(folder / FIRST)], "sweep": ["--run", str(folder / FIRST)]}.get(
        command, ["--results", str(folder)])
    config = resolve_defconfig((ROOT / "defconfigs" / "lenet5-quick").read_text(), tmp_path / ".config")
    done = _cli_read_only(folder, command, "--config", str(config), *where)  # never the developer's .config
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and ("Read-only file system" in line or "Permission" in line)
    assert "copy the results folder somewhere writable" in line
    assert _snapshot(folder) == before


def test_the_atomic_writer_on_a_read_only_file_system_raises_one_error(tmp_path, monkeypatch):
    """Its clean-up cannot unlink even a missing temporary file there (EROFS): that must not hide the error."""
    import errno

    from lib.core.files import write_json_atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(Path, "open", read_only)
    with pytest.raises(HarnessError, match=r"^cannot write .*x\.json: Read-only file system; make its folder "
                                           r"writable") as info:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert info.value.__context__ is None or not isinstance(info.value.__context__, OSError) or \
        info.value.__suppress_context__


def _two_folders(base: Path) -> tuple[Path, Path]:
    old, new = base / "acc_20250101_000000", base / "acc_20250102_000000"
    build(old)
    build(new)
    for folder, stamp in ((old, 1_700_000_000.0), (new, 1_700_086_400.0)):
        data = json.loads((folder / "matrix.json").read_text())
        (folder / "matrix.json").write_text(json.dumps({**data, "created_unix": stamp}))
    os.utime(old / "matrix.json")  # the old folder was touched last (e.g. `make report RESULTS=<old>`)
    return old, new


def test_newest_is_by_creation_stamp_not_modification_time(tmp_path, capsys):
    old, new = _two_folders(tmp_path / "results")
    assert cli.main(["graphs", "--set", f"RESULTS_DIR={tmp_path / 'results'}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"graphs: {new}"  # says which folder it worked on
    assert (new / "graphs").is_dir() and not (old / "graphs").exists()


@pytest.mark.parametrize("command", ["report", "graphs", "compare", "publish"])
def test_results_dir_is_honoured_by_every_results_command(tmp_path, command):
    build(tmp_path / "results" / "acc_20250101_000000")  # a folder exists, but not where RESULTS_DIR points
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = ["--name", "x"] if command == "publish" else []
    result = _cli(command, "--set", f"RESULTS_DIR={empty}", *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: no results folder under {empty}; run `make` first, or give " \
                                    f"RESULTS=<dir> or RESULTS_DIR=<folder of results folders>"
    assert not (tmp_path / "results" / "acc_20250101_000000" / "graphs").exists()


def test_results_that_is_not_a_results_folder_is_one_line(tmp_path):
    result = _cli("graphs", "--results", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {tmp_path}: not a results folder")


def test_continue_picks_the_newest_unfinished_by_creation_stamp(tmp_path):
    old, new = _two_folders(tmp_path / "results")
    for folder in (old, new):
        (folder / FIRST / "summary.json").unlink()
    assert matrix.newest_unfinished(str(tmp_path / "results")) == new


# One trainer per run folder ---------------------------------------------------------------------------------

def _folder(tmp_path: Path, max_iters: int) -> tuple[Path, Path]:
    folder = tmp_path / "results" / "t_1"
    spec = tiny_spec("long", max_iters=max_iters)
    (folder / spec.name).mkdir(parents=True)
    spec.write(folder / spec.name / "spec.json")
    (folder / "matrix.json").write_text(json.dumps({"created": "now", "command": "test", "runs": [spec.name]}))
    return folder, folder / spec.name


def _wait_for_trainer(run_dir: Path, not_pid: int | None = None, timeout: float = 60) -> int:
    """The PID of the process that holds the run folder's lock, once it holds it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            runlock.check_free(run_dir, grace_s=0)
        except runlock.RunBusyError:
            pid = runlock.holder(run_dir)
            if pid.isdigit() and int(pid) != not_pid:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no trainer took {run_dir}'s lock within {timeout} s")


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return True
        if state in ("Z", "X"):  # exited; only its reaping is left to init
            return True
        time.sleep(0.1)
    return False


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    folder, run_dir = _folder(tmp_path, max_iters=100_000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([PY, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_trainer(run_dir) == first.pid
        second = subprocess.run([PY, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: {run_dir} is being trained by PID {first.pid}; wait for it to "
                                         f"finish, or stop it (kill {first.pid}) and then run `make continue`")
        with pytest.raises(HarnessError, match=f"being trained by PID {first.pid}"):
            matrix.run_folder(folder, jobs=1, only_unfinished=True)  # `make continue` refuses the folder
        assert not (run_dir / "summary.json").exists()
    finally:
        first.kill()
        first.wait()
    runlock.check_free(run_dir)  # SIGKILL: the OS let go of the lock; the PID file left behind means nothing
    tiny_spec("long", max_iters=4).write(run_dir / "spec.json")
    runs = matrix.run_folder(folder, jobs=1, only_unfinished=True)
    assert runs[0]["status"] == "ok"


def test_killing_the_driver_stops_its_runs(tmp_path):
    folder, run_dir = _folder(tmp_path, max_iters=100_000)
    code = f"from pathlib import Path; from lib import matrix; matrix.run_folder(Path({str(folder)!r}), 1)"
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = _wait_for_trainer(run_dir, not_pid=driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert _gone(child), f"trainer {child} outlived its driver"
    finally:
        driver.kill()
    runlock.check_free(run_dir)


@pytest.mark.parametrize("when", ["training", "at_launch"])
def test_sigterm_to_the_driver_stops_the_runs_and_records_none_as_failed(tmp_path, when):
    """While the run trains it checkpoints and is recorded stopped; at launch, before its handlers exist, it
    dies of the signal, and is still never recorded as failed."""
    folder, run_dir = _folder(tmp_path, max_iters=100_000)
    code = f"from pathlib import Path; from lib import cli, matrix; matrix.run_folder(Path({str(folder)!r}), 1)"
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = _wait_for_trainer(run_dir, not_pid=driver.pid)
    deadline = time.time() + 60
    while when == "training" and "step " not in _text(run_dir / "log.txt"):
        assert time.time() < deadline, "the run did not start training"
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert "`make continue` finishes" in err and "KeyboardInterrupt" not in err, err
    assert _gone(child) and not (run_dir / "summary.json").exists()
    state = json.loads((folder / "summary.json").read_text())["runs"][0]["status"]
    if when == "training":
        assert "SIGTERM: 1 run(s) stopped after a checkpoint, 0 not started;" in err and state == "stopped"
    else:
        assert state in ("stopped", "queued"), state


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
