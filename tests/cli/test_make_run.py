"""Targets that train or change the tree, driven for real through `make -C <root>` (tests/make_driver.py):
a quick matrix run, continued and reported; venv, lint, test, clean, mrproper; a killed matrix resumed.
Training runs are tiny (MAX_ITERS of a few steps on the mnist5k digits that ship with the venv)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.make_driver import (
    NO_MAKE,
    QUICK_RUNS,
    ROOT,
    STAMP,
    TRAIN_TIMEOUT,
    base_env,
    config_lines,
    make,
    one_error_line,
    output,
    read_json,
    venv_pycache,
)

pytestmark = NO_MAKE


# --- a real matrix through make: run, continue, report, quickstart -----------------------------------------------


def test_make_trains_the_quick_matrix(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0, output(result)
    assert len(folders) == 1, folders
    folder = folders[0]
    assert folder.name.startswith("lenet5-quick_")
    assert f"results: {folder}" in result.stdout
    for name in ("config.txt", "matrix.json", "summary.json", "report.md"):
        assert (folder / name).is_file(), name
    runs = read_json(folder / "matrix.json")["runs"]
    assert len(runs) == QUICK_RUNS
    assert "MAX_ITERS=6" in read_json(folder / "matrix.json")["command"]
    summary = read_json(folder / "summary.json")["runs"]
    assert [s["name"] for s in summary] == runs
    assert all(s["status"] == "ok" for s in summary), [(s["name"], s["status"], s.get("error")) for s in summary]
    report = (folder / "report.md").read_text()
    for name in runs:
        assert name in report


def test_make_records_the_override(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0 and len(folders) == 1, output(result)
    folder = folders[0]
    assert "# override: MAX_ITERS=6" in (folder / "config.txt").read_text().splitlines()
    assert "CONFIG_MAX_ITERS=0" in config_lines(tmp / ".config")  # the .config itself is unchanged
    for name in read_json(folder / "matrix.json")["runs"]:
        assert read_json(folder / name / "spec.json")["train"]["max_iters"] == 6, name
        assert read_json(folder / name / "summary.json")["steps"]["done"] == 6, name


def test_continue_reruns_only_unfinished_runs(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0 and len(folders) == 1, output(result)
    folder = folders[0]
    runs = read_json(folder / "matrix.json")["runs"]
    redo = [runs[0], runs[-1]]
    for name in redo:
        (folder / name / "summary.json").unlink()
    kept = {name: ((folder / name / "summary.json").stat().st_mtime_ns, (folder / name / "summary.json").read_bytes())
            for name in runs if name not in redo}

    result = make(tmp, "continue", timeout=TRAIN_TIMEOUT)
    assert result.returncode == 0, output(result)
    assert f"2 of {QUICK_RUNS} run(s) to do" in result.stdout
    for name in redo:
        assert read_json(folder / name / "summary.json")["status"] == "ok", name
    for name, (mtime, content) in kept.items():
        path = folder / name / "summary.json"
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, f"{name} was rerun"
    summary = read_json(folder / "summary.json")["runs"]
    assert len(summary) == QUICK_RUNS and all(s["status"] == "ok" for s in summary)
    assert sorted((tmp / "results").iterdir()) == [folder], "continue must not create a new results folder"

    again = make(tmp, "continue")
    assert "no unfinished results folder" in one_error_line(again)


def test_report_rewrites_report_md(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0 and len(folders) == 1, output(result)
    folder = folders[0]
    (folder / "report.md").unlink()
    result = make(tmp, "report", RESULTS=str(folder))
    assert result.returncode == 0, output(result)
    assert str(folder / "report.md") in result.stdout
    report = (folder / "report.md").read_text()
    for name in read_json(folder / "matrix.json")["runs"]:
        assert name in report


# --- venv, lint, test, clean, mrproper ---------------------------------------------------------------------------


def test_venv_is_up_to_date_and_not_reinstalled(tmp_path):
    before = STAMP.stat().st_mtime_ns
    result = make(tmp_path, "venv")
    assert result.returncode == 0, output(result)
    assert "pip" not in result.stdout + result.stderr
    assert STAMP.stat().st_mtime_ns == before


def test_lint_runs_ruff(tmp_path):
    result = make(tmp_path, "lint")
    text = result.stdout + result.stderr
    if result.returncode == 0:
        assert "All checks passed" in text, output(result)
    else:  # the tree may be mid-edit; the target still ran ruff and reported its findings
        assert result.returncode == 2 and re.search(r"Found \d+ error", text), output(result)


def test_test_target_runs_pytest(tmp_path):
    result = make(tmp_path, "-n", "test")  # running it here would recurse into this very suite
    assert result.returncode == 0, output(result)
    assert re.search(r"python\S* -m pytest\b.* tests\b", result.stdout), output(result)


@pytest.fixture
def clean_probe():
    probe = ROOT / "tests" / "_tmp_clean_probe"
    (probe / "__pycache__").mkdir(parents=True, exist_ok=True)
    (probe / "__pycache__" / "x.pyc").write_bytes(b"")
    try:
        yield probe
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def test_clean_removes_caches_only(tmp_path, clean_probe):
    sentinel = venv_pycache()
    result = make(tmp_path, "clean")
    assert result.returncode == 0, output(result)
    assert "removed caches" in result.stdout
    assert clean_probe.is_dir() and not (clean_probe / "__pycache__").exists()
    assert sentinel is None or sentinel.is_dir(), "clean removed __pycache__ inside .venv"


def mrproper_victims(tmp: Path) -> dict[str, Path]:
    victims = {"config": tmp / ".config", "config_old": tmp / ".config.old", "results": tmp / "results",
               "venv": tmp / "fakevenv", "keep": tmp / "keep.txt"}
    victims["config"].write_text("CONFIG_EPOCHS=1\n")
    victims["config_old"].write_text("CONFIG_EPOCHS=2\n")
    (victims["results"] / "run_1").mkdir(parents=True)
    (victims["results"] / "run_1" / "summary.json").write_text("{}")
    (victims["venv"] / "bin").mkdir(parents=True)
    (victims["venv"] / "bin" / "python").write_text("#!/bin/false\n")
    victims["keep"].write_text("not mrproper's\n")
    return victims


def test_mrproper_refuses_without_yes_and_deletes_nothing_of_its_own(tmp_path):
    victims = mrproper_victims(tmp_path)
    result = make(tmp_path, "mrproper", VENV=str(victims["venv"]))  # stdin is /dev/null: not a terminal
    assert result.returncode != 0, output(result)
    assert "YES=1" in one_error_line(result)
    for name, path in victims.items():
        assert path.exists(), f"mrproper without YES=1 deleted {name}"


def test_mrproper_refused_deletes_no_caches(tmp_path, clean_probe):
    victims = mrproper_victims(tmp_path)
    result = make(tmp_path, "mrproper", VENV=str(victims["venv"]))
    assert result.returncode != 0, output(result)
    assert (clean_probe / "__pycache__" / "x.pyc").exists()


def test_mrproper_yes_deletes_exactly_its_files(tmp_path):
    victims = mrproper_victims(tmp_path)
    sentinel = venv_pycache()
    result = make(tmp_path, "mrproper", VENV=str(victims["venv"]), YES="1")
    assert result.returncode == 0, output(result)
    assert "removed" in result.stdout
    for name in ("config", "config_old", "results", "venv"):
        assert not victims[name].exists(), f"mrproper YES=1 left {name}"
    assert victims["keep"].read_text() == "not mrproper's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert STAMP.exists() and (ROOT / "Kconfig").exists() and (ROOT / "Makefile").exists()
    assert sentinel is None or sentinel.is_dir(), "mrproper VENV=elsewhere removed __pycache__ inside .venv"


# --- a killed matrix resumes (issue 11) ------------------------------------------------------------------------

KILLABLE = """CONFIG_OPTIMIZER_MULTIPLE=y
CONFIG_OPTIMIZER_ENABLE_SGD=y
CONFIG_OPTIMIZER_ENABLE_ADAMW=y
CONFIG_PRUNING_MULTIPLE=y
CONFIG_PRUNING_ENABLE_MAGNITUDE=y
CONFIG_SPARSITY_MULTIPLE=y
CONFIG_SPARSITY_ENABLE_50=n
CONFIG_SPARSITY_ENABLE_70=n
CONFIG_MATRIX_JOBS=2
CONFIG_MAX_ITERS=60
CONFIG_CKPT_INTERVAL=8
CONFIG_LOG_INTERVAL=1
"""


def _results(folder: Path) -> dict[str, dict]:
    runs = json.loads((folder / "summary.json").read_text())["runs"]
    keys = ("status", "best", "test_at_best", "sparsity", "steps", "flags")
    return {r["name"]: {k: r.get(k) for k in keys} for r in runs}


def test_sigterm_to_makes_process_group_stops_cleanly_and_records_the_stopped_runs(tmp_path):
    """What `timeout` and schedulers send: every process of the group gets SIGTERM (make forwards a second to
    the driver). Each running run checkpoints, the folder's summary names them stopped, one error line."""
    from tests.conftest import resolve_defconfig

    resolve_defconfig(KILLABLE.replace("CONFIG_MAX_ITERS=60", "CONFIG_MAX_ITERS=100000"), tmp_path / ".config")
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), f"KCONFIG_CONFIG={tmp_path / '.config'}",
           f"RESULTS_DIR={tmp_path / 'results'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
                            start_new_session=True)
    deadline = time.time() + TRAIN_TIMEOUT
    while len(list(tmp_path.glob("results/*/*/checkpoints/step_*"))) < 2:  # both runs are training
        assert proc.poll() is None and time.time() < deadline, "the matrix ended before it could be stopped"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=TRAIN_TIMEOUT)
    assert proc.returncode != 0 and "Traceback" not in out + err, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: SIGTERM: 2 run(s) stopped after a checkpoint, 2 not "
                                                     "started;"), err
    (folder,) = tmp_path.glob("results/*")
    states = sorted(r["status"] for r in json.loads((folder / "summary.json").read_text())["runs"])
    assert states == ["queued"] * 2 + ["stopped"] * 2
    assert "4 run(s): 2 queued, 2 stopped." in (folder / "report.md").read_text()
    for run_dir in folder.iterdir():  # no trainer is left holding a run, and the stopped ones can resume
        if run_dir.is_dir() and (run_dir / "spec.json").exists():
            from lib.core import runlock

            runlock.check_free(run_dir, grace_s=0)
    assert len(list(folder.glob("*/checkpoints/latest"))) == 2


def test_a_matrix_killed_with_sigkill_resumes_to_the_same_results(tmp_path):
    from tests.conftest import resolve_defconfig

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for tmp in (whole, killed):
        tmp.mkdir()
        resolve_defconfig(KILLABLE, tmp / ".config")
    done = make(whole, timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0, output(done)
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), f"KCONFIG_CONFIG={killed / '.config'}",
           f"RESULTS_DIR={killed / 'results'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base_env(),
                            start_new_session=True)
    deadline = time.time() + TRAIN_TIMEOUT
    while not (list(killed.glob("results/*/*/summary.json")) and list(killed.glob("results/*/*/checkpoints/step_*"))):
        assert proc.poll() is None and time.time() < deadline, "the matrix ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # make, the driver and every trainer at once: nothing can save its work
    proc.wait()
    resumed = make(killed, "continue", timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, output(resumed)
    (a,), (b,) = whole.glob("results/*"), killed.glob("results/*")
    assert _results(a) == _results(b)
    records = json.loads((b / "summary.json").read_text())["runs"]
    assert any(r.get("resumed") for r in records), "no run was resumed from a checkpoint"
