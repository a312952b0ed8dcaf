"""A full disk (issue 10, item 4): one line naming the path and the free space, the matrix stops cleanly,
no temporary file is left, and `make continue` finishes once space is freed.

Before: a 45-line chained traceback, summary.json.tmp left behind, and a sibling run that kept going.
The first tests use a failing writer; the last fills a real, small tmpfs (skipped where mounting is refused).
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

from lib.core import files
from lib.core.files import DiskFullError, write_json_atomic
from lib.train import run
from tests.conftest import PY, ROOT, tiny_spec

QUICK = (ROOT / "defconfigs" / "lenet5-quick").read_text()


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"status": "ok"})

    def half_then_full(self, text):
        with open(self, "w") as f:
            f.write(text[:5])  # part of the file reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(DiskFullError) as caught:
        write_json_atomic(path, {"status": "failed"})
    message = str(caught.value)
    assert message.startswith(f"disk full writing {path} (") and " free there); free some space" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_other_write_errors_are_one_line_too(tmp_path):
    target = tmp_path / "file"
    target.mkdir()  # a directory where the file should go
    with pytest.raises(files.HarnessError, match=f"cannot write {target}: "):
        files.write_text_atomic(target, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_run_that_hits_a_full_disk_exits_with_its_own_status(tmp_path, monkeypatch, capsys):
    import lib.train.trainer

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    tiny_spec("r").write(run_dir / "spec.json")

    def full(spec, where, shard, after_surgery=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(where / "metrics.jsonl"))

    monkeypatch.setattr(lib.train.trainer, "train", full)
    monkeypatch.setattr(run.runlock, "lock_for_child", lambda d: -1)
    assert run.run(run_dir) == run.DISK_FULL_EXIT
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith(f"disk full writing {run_dir / 'metrics.jsonl'} (")
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk (root and mount rights needed; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _continue(config: Path, results: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "lib.cli", "continue", "--config", str(config), "--set",
                           f"RESULTS_DIR={results}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_matrix_on_a_full_disk_stops_cleanly_and_continue_finishes(small_disk, make_config):
    results = small_disk / "results"
    folder = results / "t_20250101_000000"
    specs = [tiny_spec(f"run{i}", max_iters=12, seed=i) for i in range(2)]
    for spec in specs:
        (folder / spec.name).mkdir(parents=True)
        spec.write(folder / spec.name / "spec.json")
    (folder / "matrix.json").write_text(json.dumps({"created": "2025-01-01T00:00:00", "command": "test",
                                                    "runs": [s.name for s in specs]}))
    filler = small_disk / "filler"
    with filler.open("wb") as f:  # leave about 96 KiB: less than one LeNet-5 checkpoint
        f.write(b"\0" * (4 * 2**20 - 96 * 2**10))
    config = make_config(QUICK + "CONFIG_MATRIX_JOBS=2\n")

    stopped = _continue(config, results)
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stdout + stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full"), stopped.stderr
    assert " free " in lines[0] and "make continue" in lines[0]
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left

    filler.unlink()
    finished = _continue(config, results)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert [_status(folder / s.name) for s in specs] == ["ok"] * 2
    assert (folder / "report.md").is_file()


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_files_written_atomically_follow_the_umask_whatever_the_writer(tmp_path: Path) -> None:
    """safetensors wrote exports 0600; every record now gets the mode a plain open() would give."""
    import os

    def private(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))

    before = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "model.safetensors", private)
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        files.write_atomic(tmp_path / "secret.json", private)
        assert (tmp_path / "secret.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(before)
