"""Scripted configuration and cells of a matrix: `make set CONFIG="..."` and `make ONLY=<glob>`.

Driven through make where the issue asks for the make target itself, in-process for the other refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lib import cli
from tests.conftest import ROOT
from tests.make_driver import (
    TRAIN_TIMEOUT,
    config_lines,
    make,
    matrix_rows,
    one_error_line,
    output,
)


def kconfig_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kconfig_tool", ROOT / "scripts" / "kconfig_tool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quick(quick_config: Path, tmp_path: Path) -> Path:  # noqa: F811
    shutil.copy(quick_config, tmp_path / ".config")
    return tmp_path / ".config"


def test_make_set_edits_the_config_with_commas_and_quotes_kept(quick: Path) -> None:
    done = make(quick.parent, "set", CONFIG='MAX_ITERS=200 CONFIG_SEEDS=3 RESULTS_NAME="a, b" DEVICE_AUTO=y')
    assert done.returncode == 0, output(done)
    lines = config_lines(quick)
    assert {"CONFIG_MAX_ITERS=200", "CONFIG_SEEDS=3", 'CONFIG_RESULTS_NAME="a, b"', "CONFIG_DEVICE_AUTO=y"} <= \
        set(lines)
    assert "CONFIG_DEVICE_CPU=y" not in lines  # the choice moved


def test_make_set_refuses_an_unknown_symbol_in_one_line_and_keeps_the_file(quick: Path) -> None:
    before = quick.read_bytes()
    line = one_error_line(make(quick.parent, "set", CONFIG="MAX_ITER=3"))
    assert line == "error: make set: CONFIG_MAX_ITER is not a symbol of this Kconfig tree; closest: CONFIG_MAX_ITERS"
    assert quick.read_bytes() == before


@pytest.mark.parametrize("setting, message", [
    ("SEEDS=0", "CONFIG_SEEDS=0 is outside its range [1, 100]"),
    ("SEEDS=x", "CONFIG_SEEDS='x' takes a whole number"),
    ("DEVICE_CPU=maybe", "a yes/no setting takes y or n"),
    ("GPT2_BLOCK_SIZE=64", "CONFIG_GPT2_BLOCK_SIZE has no effect: it depends on MODEL_GPT2 || MODEL_ENABLE_GPT2"),
    ("EPOCHS", "'EPOCHS' is not SYMBOL=VALUE"),
    ("", 'make set needs CONFIG="SYMBOL=VALUE [SYMBOL=VALUE ...]"'),
    ("MAX_ITERS=5 TIME_BUDGET=5", "CONFIG_TIME_BUDGET='5' has no unit"),
])
def test_make_set_refuses_bad_settings_in_one_line(quick: Path, monkeypatch, capsys, setting: str,
                                                   message: str) -> None:
    monkeypatch.setenv("KCONFIG_CONFIG", str(quick))
    before = quick.read_bytes()
    assert kconfig_tool().main(["set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert quick.read_bytes() == before
    assert not list(quick.parent.glob(".*.set"))


def test_make_set_without_a_config_says_how_to_make_one(tmp_path: Path) -> None:
    line = one_error_line(make(tmp_path, "set", CONFIG="MAX_ITERS=3"))
    assert "does not exist; write one first (`make defconfig-<name>`)" in line


def test_only_dry_runs_the_matching_cells(quick: Path) -> None:
    done = make(quick.parent, "dry-run", ONLY="*_adamw_*_70,lenet5_sgd_*")
    assert done.returncode == 0, output(done)
    names = [row[1] for row in matrix_rows(done.stdout)]
    assert names == ["lenet5_sgd_none_0", "lenet5_sgd_magnitude_50", "lenet5_sgd_magnitude_70",
                     "lenet5_sgd_magnitude_90", "lenet5_adamw_magnitude_70"], names
    assert "5 run(s); nothing trained" in done.stdout


def test_only_matching_nothing_is_one_line_naming_some_runs(quick: Path) -> None:
    line = one_error_line(make(quick.parent, "dry-run", ONLY="*resnet*"))
    assert line.startswith("error: ONLY='*resnet*' matches no run here; the runs are named like lenet5_")
    assert "(12 in all)" in line


def test_make_only_trains_one_cell_and_records_the_command(quick: Path) -> None:
    done = make(quick.parent, ONLY="lenet5_adamw_magnitude_50", MAX_ITERS="3", timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0, output(done)
    folder = next((quick.parent / "results").iterdir())
    matrix = json.loads((folder / "matrix.json").read_text())
    assert matrix["runs"] == ["lenet5_adamw_magnitude_50"]
    assert 'ONLY="lenet5_adamw_magnitude_50"' in matrix["command"]
    summary = json.loads((folder / "summary.json").read_text())["runs"]
    assert [(r["name"], r["status"], r["steps"]["done"]) for r in summary] == [("lenet5_adamw_magnitude_50", "ok", 3)]


def test_continue_with_only_finishes_just_those(quick: Path, tmp_path: Path) -> None:
    from lib import config as config_mod
    from lib import matrix

    config = config_mod.load(quick, {"RESULTS_DIR": str(tmp_path / "results"), "MAX_ITERS": "2"})
    folder = matrix.create_results_folder(config, matrix.expand(config), "make (test)")
    assert cli.main(["continue", "--config", str(quick), "--results", str(folder), "--only", "lenet5_sgd_none_0"]) == 0
    finished = sorted(p.parent.name for p in folder.glob("*/summary.json"))
    assert finished == ["lenet5_sgd_none_0"]
    assert cli.main(["continue", "--config", str(quick), "--results", str(folder), "--only", "x*"]) == 2
