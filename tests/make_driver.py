"""Driving the Makefile for real in tests: `make -C <root>` in a subprocess, pointed at temporary files.

Each make call is pointed at temporary files (KCONFIG_CONFIG, RESULTS_DIR, DEFCONFIG_OUT),
so the developer's own .config, results/ and ./defconfig are never read or written.
Shared by tests/cli (every target) and the tests elsewhere that train through make.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kconfiglib
import pytest

ROOT = Path(__file__).resolve().parent.parent  # tests/ sits at the top of the project
QUICK_RUNS = 12  # defconfigs/lenet5-quick: sgd, adamw x (dense + magnitude x 3) + adamwprune x (dense + state x 3)
VENV = ROOT / ".venv"
PY = str(VENV / "bin" / "python")
STAMP = VENV / ".installed"
DEFCONFIGS = ROOT / "defconfigs"
QUICK = "lenet5-quick"
TIMEOUT = 120  # seconds for a make call that trains nothing
TRAIN_TIMEOUT = 300  # seconds for a make call that trains a matrix

# Variables a calling make (e.g. `make test MAX_ITERS=3`) or the user's shell could leak into ours.
LEAKY_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "KCONFIG_CONFIG", "KCONFIG_SEED", "MAX_ITERS",
             "EPOCHS", "SEEDS", "TIME", "RESULTS_DIR", "RESULTS", "YES", "VENV", "DEFCONFIG_OUT", "HARNESS_COMMAND",
             "MENUCONFIG_STYLE", "NAME", "AGAINST", "RUN", "ONLY", "CONFIG", "PYTHON", "WHEELS", "PARTS", "DRY",
             "FORMAT", "HF", "TASKS", "LIMIT", "SPARSE", "QUANT")

NO_MAKE = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env.update(extra)
    return env


def make(tmp: Path, *args: str, timeout: float = TIMEOUT, env: dict[str, str] | None = None,
         **variables: str) -> subprocess.CompletedProcess:
    """`make -C ROOT args...` with the config, results and defconfig paths inside ``tmp``.

    ``variables`` are passed as VAR=value on the command line and override the tmp defaults.
    """
    values = {"KCONFIG_CONFIG": str(tmp / ".config"), "RESULTS_DIR": str(tmp / "results"),
              "DEFCONFIG_OUT": str(tmp / "defconfig"), **variables}
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), *args, *(f"{k}={v}" for k, v in values.items())]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            env=env or base_env())
    assert "Setting up" not in result.stdout, f"make tried to reinstall the venv:\n{result.stdout}"
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failing command's single `error: ...` line (make's own `make: ***` line is set aside)."""
    assert result.returncode != 0, output(result)
    assert "Traceback" not in result.stderr, output(result)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("make: ")]
    assert len(lines) == 1, output(result)
    assert lines[0].startswith("error: "), output(result)
    return lines[0]


def config_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("CONFIG_")]


def defconfig_lines(name: str) -> list[str]:
    return [line for line in (DEFCONFIGS / name).read_text().splitlines() if line.startswith("CONFIG_")]


def kconfig_symbol(name: str) -> kconfiglib.Symbol:
    """A symbol of the Kconfig tree with no .config loaded (its value is its default)."""
    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    return kconf.syms[name]


def developer_state() -> dict[str, object]:
    """What of the developer's own files a test must leave alone (existence and mtime)."""
    state = {}
    for name in (".config", ".config.old", "results", "defconfig", ".venv", ".venv/.installed"):
        path = ROOT / name
        state[name] = path.stat().st_mtime_ns if path.exists() else None
    return state


def venv_pycache() -> Path | None:
    """One existing __pycache__ inside the real .venv, to check `clean` leaves the venv alone."""
    for candidate in sorted((VENV / "lib").glob("python3*/site-packages/__pycache__")):
        return candidate
    return None


def matrix_rows(stdout: str) -> list[list[str]]:
    """The numbered rows of the dry-run table, split into cells."""
    return [line.split() for line in stdout.splitlines() if re.match(r"^\d+\s+\S+\s+\S+\s+\S+\s+\d+%\s", line)]



def read_json(path: Path) -> dict:
    return json.loads(path.read_text())

