"""Fixtures of the make tests: the venv must be current and the developer's files untouched; one
quickstart .config and one trained quick matrix shared by the tests that read them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.make_driver import QUICK, ROOT, STAMP, TRAIN_TIMEOUT, base_env, developer_state, make, output


@pytest.fixture(scope="module", autouse=True)
def venv_is_current():
    """The tests must never make the Makefile reinstall the venv (that needs the network)."""
    if not STAMP.exists():
        pytest.skip(f"{STAMP} is missing: run `make venv` first (these tests never install anything)")
    stale = subprocess.run(["make", "-q", "-C", str(ROOT), ".venv/.installed"], env=base_env(),
                           capture_output=True, text=True, timeout=30)
    if stale.returncode != 0:
        pytest.fail(f"{STAMP} is older than requirements*.txt: any make target would reinstall the venv; "
                    f"run `make venv` first")
    before = developer_state()
    yield
    after = developer_state()
    changed = sorted(name for name in before if before[name] != after[name])
    assert not changed, f"the developer's {changed} changed during these tests (a make call, or another process?)"


@pytest.fixture(scope="session")
def quick_config(tmp_path_factory) -> Path:
    """A .config written by `make defconfig-lenet5-quick` (read-only for tests: copy it to change it)."""
    tmp = tmp_path_factory.mktemp("quick")
    result = make(tmp, f"defconfig-{QUICK}")
    assert result.returncode == 0, output(result)
    return tmp / ".config"


@pytest.fixture
def quick_copy(quick_config: Path, tmp_path: Path) -> Path:
    shutil.copy(quick_config, tmp_path / ".config")
    return tmp_path / ".config"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`make defconfig-lenet5-quick` then plain `make MAX_ITERS=6`: (tmp, make result, results folder)."""
    tmp = tmp_path_factory.mktemp("e2e")
    written = make(tmp, f"defconfig-{QUICK}")
    assert written.returncode == 0, output(written)
    result = make(tmp, MAX_ITERS="6", timeout=TRAIN_TIMEOUT)
    folders = sorted(p for p in (tmp / "results").iterdir()) if (tmp / "results").is_dir() else []
    return tmp, result, folders

