"""List axes and random search (lib/config/axes.py, lib/matrix/cells.py; issue 31): names that say what varied,
dry-run columns, a short LeNet-5 list matrix that trains and compares like with like, a random search that runs
its N cells and continues them, today's defconfigs named as before, and every bad list in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import kconfiglib
import pytest

from lib import cli, config, hardware, matrix
from lib.core.errors import ConfigError
from lib.results import compare
from lib.results import load as load_results
from tests.conftest import ROOT

CPU = hardware.Devices("cpu", cpu_cores=2)
LISTS = """CONFIG_OPTIMIZER_ADAMW=y
CONFIG_PRUNING_MAGNITUDE=y
CONFIG_SPARSITY_LIST="30,97.5"
CONFIG_ADAMW_LR_LIST="1e-3,3e-3"
CONFIG_IMPORTANCE_LIST="magnitude,gradient-sensitivity"
CONFIG_MAX_ITERS=4
CONFIG_EVAL_INTERVAL=2
CONFIG_DEVICE_CPU=y
CONFIG_MATRIX_JOBS=2
"""
RANDOM = LISTS.replace('"30,97.5"', '"30,60,90"') + "CONFIG_MATRIX_SEARCH_RANDOM=y\nCONFIG_MATRIX_SEARCH_RUNS=2\n"


def test_lists_multiply_the_cells_and_names_say_what_varied(make_config) -> None:
    specs = matrix.expand(config.load(make_config(LISTS)), CPU)
    assert [s.name for s in specs] == [f"lenet5_adamw_magnitude_{pct}_lr{lr}_{metric}" for pct in ("30", "97.5")
                                       for lr in ("0.001", "0.003") for metric in ("magnitude", "gradient-sensitivity")]
    assert [(s.optim.lr, s.prune.importance, s.prune.target) for s in specs][5] == (1e-3, "gradient-sensitivity",
                                                                                     0.975)
    table = matrix.dry_run_table(specs).splitlines()
    assert table[0].split() == ["#", "run", "optimizer", "pruning", "sparsity", "lr", "importance", "seed", "plan"]
    assert table[8].split()[4:7] == ["97.5%", "0.003", "magnitude"]


def test_a_list_touches_only_the_methods_that_use_it(make_config) -> None:
    lines = LISTS.replace("CONFIG_PRUNING_MAGNITUDE=y", "CONFIG_PRUNING_MULTIPLE=y\nCONFIG_PRUNING_ENABLE_NONE=y\n"
                          "CONFIG_PRUNING_ENABLE_MOVEMENT=y\nCONFIG_PRUNING_ENABLE_MAGNITUDE=y")
    names = [s.name for s in matrix.expand(config.load(make_config(lines)), CPU)]
    assert "lenet5_adamw_none_0_lr0.001" in names and "lenet5_adamw_movement_97.5_lr0.003" in names
    assert len(names) == 2 + 4 + 8  # none once per rate; movement per rate and target; magnitude also per metric


def test_todays_defconfigs_keep_their_run_names(tmp_path: Path) -> None:
    """The names every defconfig expanded to before list axes existed (commit 36c8e51), kept as published."""
    before = json.loads((ROOT / "tests" / "matrix" / "defconfig_names.json").read_text())
    os.environ["srctree"] = str(ROOT)
    now = {}
    for defconfig in sorted((ROOT / "defconfigs").iterdir()):
        kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
        kconf.load_config(str(defconfig))
        kconf.write_config(str(tmp_path / ".config"))
        now[defconfig.name] = [s.name for s in matrix.expand(config.load(tmp_path / ".config"), CPU)]
    assert now == before


def test_a_list_matrix_trains_and_compares_only_like_with_like(make_config, tmp_path: Path) -> None:
    path = make_config(LISTS)
    assert cli.main(["run", "--config", str(path), "--set", f"RESULTS_DIR={tmp_path / 'results'}"]) == 0
    folder = next((tmp_path / "results").iterdir())
    runs = load_results(folder).runs
    assert sorted(r.name for r in runs) == sorted(s.name for s in matrix.expand(config.load(path), CPU))
    assert all(r.status == "ok" for r in runs)
    groups = compare.method_groups(runs)
    assert len(groups) == 8 and all(len(g.runs) == 1 for g in groups)  # no rate or metric is paired with another
    told = [frozenset(g.label.split(" [")[1].rstrip("]").split(", ")) for g in groups]  # what sets each apart
    metrics = ("magnitude", "gradient-sensitivity")
    assert len(told) == 8 and set(told) == {frozenset({f"optim.lr={lr}", f"prune.importance={metric}"})
                                            for lr in (0.001, 0.003) for metric in metrics}


def test_random_search_draws_its_n_cells_reproducibly_and_continue_finishes_them(make_config, tmp_path: Path) -> None:
    grid = matrix.expand(config.load(make_config(RANDOM.replace("CONFIG_MATRIX_SEARCH_RANDOM=y", ""))), CPU)
    path = make_config(RANDOM)  # the same file, rewritten
    drawn = [s.name for s in matrix.expand(config.load(path), CPU)]
    assert len(grid) == 12 and len(drawn) == 2 and set(drawn) < {s.name for s in grid}
    assert drawn == [s.name for s in matrix.expand(config.load(path), CPU)]  # the same seed draws the same
    other = [s.name for s in matrix.expand(config.load(path, {"MATRIX_SEARCH_SEED": "7"}), CPU)]
    assert other != drawn and len(other) == 2
    folder = matrix.create_results_folder(config.load(path, {"RESULTS_DIR": str(tmp_path)}),
                                          matrix.expand(config.load(path), CPU), "make (test)")
    assert cli.main(["continue", "--config", str(path), "--results", str(folder)]) == 0
    shutil.rmtree(folder / drawn[1])  # one cell lost: continue trains just that one again
    (folder / drawn[1]).mkdir()
    matrix.expand(config.load(path), CPU)[1].write(folder / drawn[1] / "spec.json")
    assert cli.main(["continue", "--config", str(path), "--results", str(folder)]) == 0
    summary = json.loads((folder / "summary.json").read_text())["runs"]
    assert sorted((r["name"], r["status"]) for r in summary) == sorted((n, "ok") for n in drawn)


@pytest.mark.parametrize("line, words", [
    ('CONFIG_SPARSITY_LIST="30,,60"', "value 2 is empty"),
    ('CONFIG_SPARSITY_LIST="30,sixty"', "'sixty' is not a number"),
    ('CONFIG_SPARSITY_LIST="30,100"', "100 is outside (0, 100)"),
    ('CONFIG_SPARSITY_LIST="30,60,30"', "'30' is given twice"),
    ('CONFIG_SPARSITY_LIST="0.5,0.9"', "looks like fractions; write percentages, e.g. '50,90'"),
    ('CONFIG_ADAMW_LR_LIST="1e-3,-1"', "-1 is not a learning rate"),
    ('CONFIG_SGD_LR_LIST="0.1"', "sgd is not an optimizer of the matrix"),
    ('CONFIG_IMPORTANCE_LIST="magnitude,taylor"', "'taylor' is not a importance; valid: magnitude"),
    ('CONFIG_SCHEDULE_LIST="cubic,cubic"', "'cubic' is given twice"),
    ('CONFIG_THRESHOLD_LIST="exact,median"', "'median' is not a threshold"),
])
def test_a_bad_list_is_one_line(make_config, line: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        config.load(make_config(LISTS, line))
    assert "\n" not in str(caught.value)


def test_a_list_no_method_of_the_matrix_uses_is_one_line(make_config) -> None:
    lines = "CONFIG_OPTIMIZER_ADAMW=y\nCONFIG_PRUNING_NONE=y\n"
    for line, words in (('CONFIG_IMPORTANCE_LIST="magnitude"', "uses a importance"),
                        ('CONFIG_SPARSITY_LIST="50"', "uses a sparsity"),
                        ('CONFIG_THRESHOLD_LIST="sampled"', "uses a threshold")):
        with pytest.raises(ConfigError, match=words):
            config.load(make_config(lines, line))


def test_more_random_cells_than_the_grid_is_one_line(make_config) -> None:
    with pytest.raises(ConfigError, match="CONFIG_MATRIX_SEARCH_RUNS=13 is more than the 12 cells of the grid"):
        matrix.expand(config.load(make_config(RANDOM, "CONFIG_MATRIX_SEARCH_RUNS=13")), CPU)
