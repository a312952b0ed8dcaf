"""Specs that rerun forever: a schema version with migrations (lib/core/spec.py) and `make rerun`
(lib/matrix/rerun.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lib import cli
from lib.core.spec import SCHEMA_VERSION, RunSpec, migrate
from lib.core.task import get_task
from lib.matrix.rerun import compare
from lib.optim import build_optimizer
from lib.pruning import build_pruner
from tests.conftest import ROOT
from tests.make_driver import TRAIN_TIMEOUT, make

PUBLISHED = sorted(ROOT.glob("key_results/*/*/spec.json"))
ADAMW_RUN = ROOT / "key_results" / "2026-12-02_lenet5-all-methods-released-spam" / "lenet5_adamw_none_0_s1"
# The RunSpec's fields at each schema version: a change without a new version and a migration fails here.
FIELDS_AT = {1: "acaed99b1517", 2: "87e3c8f2c375", 3: "fb815d79c2f8", 4: "f30e92659bcc", 5: "1bdd6231f5d0",
             6: "6342e3af9293", 7: "f1cc2960bfe2", 8: "d5ead589acb2"}


def fields_digest() -> str:
    def walk(kind: type) -> list[str]:
        out = []
        for f in dataclasses.fields(kind):
            out.append(f"{kind.__name__}.{f.name}:{f.type}")
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                out += walk(f.default_factory)
        return out

    from lib.core import spec as spec_mod

    names = walk(RunSpec) + [line for part in ("OptimSettings", "PruneSettings", "TrainSettings", "HardwarePlan")
                             for line in walk(getattr(spec_mod, part))]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def test_the_spec_fields_change_only_with_a_new_schema_version() -> None:
    assert fields_digest() == FIELDS_AT[SCHEMA_VERSION], (
        "the RunSpec's fields changed: bump lib/core/spec.py's SCHEMA_VERSION, add a migration from the version before "
        f"to _MIGRATIONS, and record FIELDS_AT[{SCHEMA_VERSION + 1}] = {fields_digest()!r} here")


def test_every_published_spec_loads_and_builds_with_todays_code() -> None:
    assert len(PUBLISHED) >= 234
    for path in PUBLISHED:
        spec = RunSpec.read(path)
        assert spec.name == path.parent.name
        assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # today's schema round-trips
        torch.manual_seed(0)
        model = get_task(spec.model).build_model(spec)
        optimizer = build_optimizer(model, spec.optim)
        build_pruner(model, optimizer, spec.prune)


def test_todays_specs_carry_the_schema_version() -> None:
    assert RunSpec.read(PUBLISHED[0]).to_dict()["schema"] == SCHEMA_VERSION == 8


def test_removed_behaviour_is_named_only_where_a_run_used_it() -> None:
    old = json.loads((ROOT / "key_results" / "2026-11-21_lenet5-all-methods" / "lenet5_adamwspam_none_0_s1" /
                      "spec.json").read_text())
    data, notes = migrate(old)
    assert data["optim"]["spam_form"] == "released" and "sample_fraction" not in data["prune"]
    assert len(notes) == 1 and notes[0].startswith("AdamWSPAM's 'paper' form was removed")
    adamw = json.loads((ROOT / "key_results" / "2026-11-21_lenet5-all-methods" / "lenet5_adamw_none_0_s1" /
                        "spec.json").read_text())
    assert migrate(adamw)[1] == []  # the paper form was the default then, but AdamW never used it
    sampled = {**adamw, "prune": {**adamw["prune"], "method": "magnitude", "threshold": "sampled"}}
    notes = migrate(sampled)[1]
    assert len(notes) == 1 and "sampled threshold drew 0.02 of the scores" in notes[0]
    assert migrate({**RunSpec.read(PUBLISHED[0]).to_dict()})[1] == []  # today's spec: nothing to say


def test_a_spec_from_a_newer_harness_is_one_line(tmp_path: Path) -> None:
    data = {**json.loads(PUBLISHED[0].read_text()), "schema": SCHEMA_VERSION + 1}
    (tmp_path / "spec.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match=rf"schema {SCHEMA_VERSION + 1} is newer than this harness's"):
        RunSpec.read(tmp_path / "spec.json")


def test_make_rerun_of_a_published_lenet5_adamw_run_is_identical(tmp_path: Path) -> None:
    done = make(tmp_path, "rerun", RUN=str(ADAMW_RUN), timeout=TRAIN_TIMEOUT)  # RESULTS_DIR=tmp_path/results
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.match(rf"lenet5_adamw_none_0_s1: identical to {ADAMW_RUN}: best val accuracy \S+ at step \d+", last), last
    folder = next((tmp_path / "results").iterdir())
    assert folder.name.startswith("rerun_lenet5_adamw_none_0_s1_")
    assert json.loads((folder / "lenet5_adamw_none_0_s1" / "spec.json").read_text())["schema"] == SCHEMA_VERSION


def test_a_rerun_that_differs_says_how_and_strict_makes_it_exit_1(tmp_path: Path, capsys) -> None:
    run = tmp_path / "pub" / ADAMW_RUN.name
    shutil.copytree(ADAMW_RUN, run)
    spec = json.loads((run / "spec.json").read_text())
    spec["train"].update(epochs=0, max_iters=4, eval_interval=2)  # a short run: its numbers are not the published
    (run / "spec.json").write_text(json.dumps(spec))
    results = str(tmp_path / "results")
    assert cli.main(["rerun", "--run", str(run), "--set", f"RESULTS_DIR={results}", "--strict"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "differs from" in last and "best val accuracy 97.8 -> " in last and "best step 288 -> " in last, last
    assert cli.main(["rerun", "--run", str(run), "--set", f"RESULTS_DIR={results}"]) == 0  # the verdict, exit 0


def test_compare_is_exact_to_the_bit() -> None:
    summary = json.loads((ADAMW_RUN / "summary.json").read_text())
    assert compare(summary, summary) == []
    nudged = json.loads(json.dumps(summary))
    nudged["test_at_best"]["accuracy"] += 1e-12
    assert compare(summary, nudged) == [f"test accuracy at best {summary['test_at_best']['accuracy']!r} -> "
                                        f"{nudged['test_at_best']['accuracy']!r}"]


@pytest.mark.parametrize("setup, message", [
    ("none", "rerun needs RUN=<run folder>"),
    ("not_a_run", "not a run folder (no spec.json)"),
    ("no_summary", "has no readable summary.json"),
    ("failed", "ended 'failed', not ok"),
])
def test_rerun_bad_input_is_one_line(tmp_path: Path, capsys, setup: str, message: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if setup in ("no_summary", "failed"):
        shutil.copy(ADAMW_RUN / "spec.json", run / "spec.json")
    if setup == "failed":
        (run / "summary.json").write_text(json.dumps({"name": "x", "status": "failed"}))
    argv = ["rerun"] + ([] if setup == "none" else ["--run", str(run)])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "results").exists()
