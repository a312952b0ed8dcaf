"""`make ... PYTHON=/path/python3` (lib/core/pyenv.py): the harness on an interpreter that is not .venv.

The interpreters here are built from the project's .venv without touching it: a bare venv (no
packages at all), and a venv that sees .venv's packages through symlinks except kconfiglib, which
then comes from a wheel folder the way `make gpu-wheels` + `make gpu-check` bring it to a GPU node.
Make runs in a copy of the working tree, so a .venv built by mistake would show there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lib.core import pyenv
from tests.conftest import ROOT
from tests.make_driver import LEAKY_ENV, QUICK_RUNS, TRAIN_TIMEOUT, read_json

VENV_PY = ROOT / ".venv" / "bin" / "python"
KCONFIGLIB_FILES = ("kconfiglib", "menuconfig", "olddefconfig", "savedefconfig", "listnewconfig", "allyesconfig",
                    "allnoconfig", "alldefconfig", "defconfig", "genconfig", "setconfig", "oldconfig", "guiconfig")

pytestmark = pytest.mark.skipif(not VENV_PY.exists() or shutil.which("make") is None,
                                reason="needs the project's .venv (make venv) and GNU make")


def make(tree: Path, *args: str, timeout: float = 120, **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV and k != "PYTHONPATH"}
    cmd = ["make", "--no-print-directory", "-C", str(tree), *args, *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree's files (tracked and untracked, not ignored) in a folder with no .venv."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    out = tmp_path_factory.mktemp("tree")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, out / name)
    return out


def venv(folder: Path, visible: Path | None = None) -> Path:
    """A venv without pip; ``visible``, if given, goes on its path through a .pth file."""
    subprocess.run([str(VENV_PY), "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    if visible:
        site = next((folder / "lib").glob("python*/site-packages"))
        (site / "visible.pth").write_text(f"{visible}\n")
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def without_kconfiglib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter that sees every package of .venv (pip too) except kconfiglib."""
    base = tmp_path_factory.mktemp("nokconf")
    farm = base / "packages"
    farm.mkdir()
    source = next((ROOT / ".venv" / "lib").glob("python*/site-packages"))
    for entry in source.iterdir():
        if entry.stem not in KCONFIGLIB_FILES and not entry.name.startswith("kconfiglib-"):
            (farm / entry.name).symlink_to(entry)
    return venv(base / "venv", farm)


def wheel_of_installed(dist: str, out: Path) -> Path:
    """A wheel rebuilt from ``dist``'s installed files (the tests never download)."""
    found = importlib.metadata.distribution(dist)
    files = [f for f in found.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)
             and f.name != "RECORD"]
    info = next(str(f).split("/")[0] for f in files if ".dist-info/" in str(f))
    path = out / f"{pyenv.normalise(dist)}-{found.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for f in files:
            wheel.write(found.locate_file(f), str(f))
        wheel.writestr(f"{info}/RECORD", "\n".join([f"{f},," for f in files] + [f"{info}/RECORD,,"]) + "\n")
    return path


def test_dry_run_and_the_quickstart_run_on_another_interpreter_without_building_venv(tree: Path,
                                                                                   tmp_path: Path) -> None:
    variables = {"PYTHON": str(VENV_PY), "KCONFIG_CONFIG": str(tmp_path / ".config"),
                 "RESULTS_DIR": str(tmp_path / "results")}
    only = "lenet5_sgd_magnitude_90,lenet5_adamwprune_bitter7_state_90"  # two of its runs: one per parallel slot
    quick = make(tree, "quickstart", MAX_ITERS="4", ONLY=only, timeout=TRAIN_TIMEOUT, **variables)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    dry = make(tree, "dry-run", **variables)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "nothing trained (dry-run)" in dry.stdout
    assert not (tree / ".venv").exists(), "PYTHON= must not build .venv"
    folder = next((tmp_path / "results").iterdir())
    runs = read_json(folder / "summary.json")["runs"]
    done = [r for r in runs if r["status"] == "ok"]
    assert sorted(r["name"] for r in done) == sorted(only.split(",")), runs
    assert all(r["steps"]["done"] == 4 for r in done) and len(runs) <= QUICK_RUNS, runs


def test_an_interpreter_that_does_not_exist_is_one_line(tree: Path, tmp_path: Path) -> None:
    done = make(tree, "dry-run", PYTHON=str(tmp_path / "no" / "python3"), KCONFIG_CONFIG=str(tmp_path / ".config"))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(f"error: PYTHON={tmp_path / 'no' / 'python3'} is not an "
                                                  f"interpreter here"), done.stderr
    assert not (tree / ".venv").exists()


def test_an_interpreter_without_the_packages_names_them_and_make_gpu_wheels(tree: Path, tmp_path: Path) -> None:
    bare = venv(tmp_path / "bare")
    done = make(tree, "dry-run", PYTHON=str(bare), KCONFIG_CONFIG=str(tmp_path / ".config"),
                WHEELS=str(tmp_path / "wheels"))
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[0]
    assert line.startswith(f"error: {bare} lacks torch, numpy,") and "kconfiglib" in line, done.stderr
    assert "make gpu-wheels" in line and f"there is no wheel folder {tmp_path / 'wheels'}/" in line


def test_missing_wheels_install_into_a_temporary_folder_and_make_uses_it(tree: Path, tmp_path: Path,
                                                                         without_kconfiglib: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_of_installed("kconfiglib", wheels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = [str(without_kconfiglib), "-c", "import kconfiglib"]
    assert subprocess.run(check, env=env, capture_output=True, cwd=tmp_path).returncode == 1
    site = subprocess.run([str(without_kconfiglib), "-m", "lib.core.pyenv", "site", "--wheels", str(wheels)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert site.startswith(str(Path(os.environ.get("TMPDIR", "/tmp")))), site
    shutil.rmtree(site, ignore_errors=True)
    try:
        done = make(tree, "list-defconfigs", PYTHON=str(without_kconfiglib), WHEELS=str(wheels))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "installed kconfiglib-" in done.stderr and "lenet5-quick" in done.stdout
        assert (Path(site) / "kconfiglib.py").is_file()
        assert subprocess.run(check, env=env, capture_output=True, cwd=tmp_path).returncode == 1  # unchanged
        again = make(tree, "list-defconfigs", PYTHON=str(without_kconfiglib), WHEELS=str(wheels))
        assert again.returncode == 0 and "installed" not in again.stderr  # found there the next time
        where = {"PYTHON": str(without_kconfiglib), "WHEELS": str(wheels), "KCONFIG_CONFIG": str(tmp_path / "cfg"),
                 "RESULTS_DIR": str(tmp_path / "results")}
        assert make(tree, "defconfig-lenet5-adamw-dense", **where).returncode == 0
        trained = make(tree, "run", MAX_ITERS="2", timeout=TRAIN_TIMEOUT, **where)  # each run is a child process
        assert trained.returncode == 0, trained.stdout + trained.stderr
        runs = read_json(next((tmp_path / "results").iterdir()) / "summary.json")["runs"]
        assert [r["status"] for r in runs] == ["ok"], runs
    finally:
        shutil.rmtree(site, ignore_errors=True)


def test_gpu_wheels_asks_pip_for_the_pinned_pure_python_wheels(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []

    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        folder = Path(command[command.index("-d") + 1])
        for spec in command[command.index("-d") + 2:]:
            name, version = spec.split("==")
            (folder / f"{pyenv.normalise(name)}-{version}-py3-none-any.whl").write_bytes(b"x" * 1024)
        (folder / "kconfiglib-13.0.0-py3-none-any.whl").write_bytes(b"old")  # a stale version: removed
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(pyenv.subprocess, "run", fake_pip)
    assert pyenv.download(tmp_path / "w", "3.12") == 0
    command = calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(command) and command[command.index("--python-version") + 1] \
        == "3.12"
    pins = pyenv.pins()
    assert [c for c in command if "==" in c] == [f"{d}=={pins[pyenv.normalise(d)]}" for d in pyenv.WHEEL_DISTS]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(
        f"{pyenv.normalise(d)}-{pins[pyenv.normalise(d)]}-py3-none-any.whl" for d in pyenv.WHEEL_DISTS)
    assert "6 wheels" in capsys.readouterr().out


def test_gpu_wheels_refuses_a_folder_too_big_to_carry(tmp_path: Path, monkeypatch, capsys) -> None:
    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        folder = Path(command[command.index("-d") + 1])
        (folder / "huge-1.0-py3-none-any.whl").write_bytes(b"\0" * (pyenv.WHEEL_LIMIT_BYTES + 1))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(pyenv.subprocess, "run", fake_pip)
    assert pyenv.download(tmp_path / "w", "3.12") == 2
    assert "over the 30 MiB" in capsys.readouterr().err


def test_gpu_wheels_without_the_index_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(pyenv.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: Could not find a version that satisfies the requirement kconfiglib==14.1.0\n"))
    assert pyenv.download(tmp_path / "w", "3.12") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it needs the package index" in err[0] and "kconfiglib==14.1.0" in err[0]


@pytest.mark.parametrize("version, warned", [("2.11.0+cu130", False), ("2.13.0", False), ("2.10.1", True),
                                             ("2.14.0", True)])
def test_torch_releases_outside_the_checked_range_are_named(monkeypatch, version: str, warned: bool) -> None:
    monkeypatch.setattr(pyenv.importlib.metadata, "version", lambda dist: version)
    note = pyenv.torch_note()
    assert bool(note) == warned
    if warned:
        assert f"torch {version} is outside" in note and "2.11 to 2.13" in note


def test_children_put_the_project_first_and_keep_the_parents_path() -> None:
    assert pyenv.pythonpath_with("/repo", {}) == "/repo"
    assert pyenv.pythonpath_with("/repo", {"PYTHONPATH": "/tmp/site:/repo::/x"}) == "/repo:/tmp/site:/x"
