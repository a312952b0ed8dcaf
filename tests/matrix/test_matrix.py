"""lib/matrix/__init__.py: expansion rules, naming, process isolation of failures, continue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib import config, hardware, matrix
from lib.core.errors import HarnessError
from lib.core.spec import RunSpec
from tests.conftest import ROOT, tiny_spec

CPU = hardware.Devices("cpu", cpu_cores=2)
QUICK = (ROOT / "defconfigs" / "lenet5-quick").read_text()


def test_quick_matrix_expansion(make_config):
    specs = matrix.expand(config.load(make_config(QUICK)), CPU)
    names = [s.name for s in specs]
    assert names == [
        "lenet5_sgd_none_0", "lenet5_sgd_magnitude_50", "lenet5_sgd_magnitude_70", "lenet5_sgd_magnitude_90",
        "lenet5_adamw_none_0", "lenet5_adamw_magnitude_50", "lenet5_adamw_magnitude_70",
        "lenet5_adamw_magnitude_90",
        "lenet5_adamwprune_none_0", "lenet5_adamwprune_bitter7_state_50", "lenet5_adamwprune_bitter7_state_70",
        "lenet5_adamwprune_bitter7_state_90",
    ]
    none_runs = [s for s in specs if s.pruning == "none"]
    assert len(none_runs) == 3 and all(s.sparsity == 0.0 for s in none_runs)  # once, at sparsity 0
    for s in specs:
        assert s.hardware.micro_batch * s.hardware.grad_accum * s.hardware.world_size == s.train.batch_size
        assert s.optim.name == s.optimizer and s.optim.lr == (0.05 if s.optimizer == "sgd" else 3e-3)
        assert s.prune.variant == ("bitter7" if s.pruning == "state" else "")
    assert len({s.name for s in specs}) == len(specs)


def test_seeds_multiply_runs_and_name_them(make_config):
    specs = matrix.expand(config.load(make_config(QUICK), {"SEEDS": "3"}), CPU)
    assert len(specs) == 36
    assert {s.name for s in specs if s.name.startswith("lenet5_adamw_none_0")} == {
        "lenet5_adamw_none_0_s1", "lenet5_adamw_none_0_s2", "lenet5_adamw_none_0_s3"}
    assert {s.seed for s in specs} == {1, 2, 3}


def test_single_run_config_is_a_matrix_of_one(make_config):
    specs = matrix.expand(config.load(make_config("CONFIG_PRUNING_MAGNITUDE=y\n")), CPU)
    assert [s.name for s in specs] == ["lenet5_adamw_magnitude_50"]


def test_dry_run_table_lists_runs_and_plans(make_config):
    table = matrix.dry_run_table(matrix.expand(config.load(make_config(QUICK)), CPU))
    assert "lenet5_adamw_magnitude_90" in table and "cpu 128x1x1=128" in table
    assert len(table.splitlines()) == 2 + 12


def test_the_plan_says_when_compact_state_applies(make_config):
    quick = "".join(line for line in QUICK.splitlines(keepends=True) if "SGD" not in line)
    specs = matrix.expand(config.load(make_config(quick, "CONFIG_COMPACT_STATE=y\n")), CPU)
    lines = matrix.plan_lines(specs)
    assert lines[-1] == ("compact optimizer state: 6 pruned runs keep their moments dense until their masks settle "
                         "(the schedule's end, PRUNING_END), then for the kept weights only; 2 runs without pruning "
                         "stay dense")
    assert not any("compact" in line for line in matrix.plan_lines(matrix.expand(config.load(make_config(QUICK)), CPU)))


def test_unwritable_results_folder_is_one_clear_error(make_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = config.load(make_config(QUICK), {"RESULTS_DIR": str(blocker / "results")})
    with pytest.raises(HarnessError, match="CONFIG_RESULTS_DIR"):
        matrix.create_results_folder(cfg, matrix.expand(cfg, CPU), "test")


def _folder_with(tmp_path: Path, specs: list[RunSpec]) -> Path:
    folder = tmp_path / "results" / "t_1"
    folder.mkdir(parents=True)
    for spec in specs:
        (folder / spec.name).mkdir()
        spec.write(folder / spec.name / "spec.json")
    (folder / "matrix.json").write_text(json.dumps({"created": "now", "command": "test",
                                                    "runs": [s.name for s in specs]}))
    return folder


def test_failures_are_isolated_and_recorded(tmp_path):
    ok = tiny_spec("ok", max_iters=6)
    raising = RunSpec.from_dict({**tiny_spec("raises").to_dict(), "model": "nosuchmodel"})
    diverging = tiny_spec("diverges", optimizer="sgd", lr=1e30, grad_clip=0.0, max_iters=10)
    crashed = tiny_spec("crashes")
    folder = _folder_with(tmp_path, [raising, ok, crashed, diverging])
    (folder / "crashes" / "spec.json").write_text("{ corrupt")  # the run process dies before training
    runs = matrix.run_folder(folder, jobs=2)
    status = {r["name"]: r["status"] for r in runs}
    assert status == {"raises": "failed", "ok": "ok", "crashes": "failed", "diverges": "diverged"}
    errors = {r["name"]: r.get("error") or "" for r in runs}
    assert "unknown model" in errors["raises"] and "spec.json" in errors["crashes"]
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["raises", "ok", "crashes", "diverges"]
    report = (folder / "report.md").read_text()
    assert "| raises | failed |" in report and "| ok | ok |" in report

    # continue: fix the crashed run's spec; only unfinished runs are redone
    crashed.write(folder / "crashes" / "spec.json")
    before = (folder / "ok" / "summary.json").read_text()
    assert matrix.newest_unfinished(str(tmp_path / "results")) == folder
    runs = matrix.run_folder(folder, jobs=2, only_unfinished=True)
    assert {r["name"]: r["status"] for r in runs}["crashes"] == "ok"
    assert (folder / "ok" / "summary.json").read_text() == before  # finished run untouched


def test_state_and_variants_expand_only_for_adamwprune(make_config):
    cfg = config.load(make_config(
        "CONFIG_OPTIMIZER_MULTIPLE=y\nCONFIG_OPTIMIZER_ENABLE_ADAMWPRUNE=y\nCONFIG_PRUNING_MULTIPLE=y\n"
        "CONFIG_PRUNING_ENABLE_STATE=y\nCONFIG_ADAMWPRUNE_VARIANT_MULTIPLE=y\n"
        "CONFIG_ADAMWPRUNE_VARIANT_ENABLE_BITTER0=y\nCONFIG_TARGET_SPARSITY=\"0.7\"\n"))
    names = [s.name for s in matrix.expand(cfg, CPU)]
    assert names == [
        "lenet5_adamw_none_0", "lenet5_adamw_magnitude_70",
        "lenet5_adamwprune_none_0",
        "lenet5_adamwprune_bitter0_state_70", "lenet5_adamwprune_bitter7_state_70",
    ]


