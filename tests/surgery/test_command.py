"""`make surgery` and CONFIG_SURGERY_EVERY on real runs: lib/surgery/command.py.
(issue 14; docs/algorithms.md, "Structure statistics and surgery")

Accept then continue trains the smaller model; a rolled-back surgery leaves every file of the run
byte-identical; bad input is one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.core.errors import HarnessError
from lib.core.spec import PruneSettings
from lib.surgery.command import operate
from tests.conftest import ROOT, folder_states, synthetic_spec, trained_run

# -- the command --------------------------------------------------------------------------------


def _trained_run(tmp_path: Path, prune: PruneSettings | None = None, max_loss_increase: float = 0.5,
                 compact_state: bool = False, **train) -> Path:
    """A trained tiny-GPT run folder (its output in tmp_path/stdout.txt)."""
    settings = {"max_iters": 20, "structure_stats_every": 5, "ckpt_interval": 10, "ckpt_milestone": 10, **train}
    spec = synthetic_spec(tmp_path, **settings)
    spec = dataclasses.replace(spec, prune=prune or spec.prune,
                               optim=dataclasses.replace(spec.optim, compact_state=compact_state),
                               surgery=dataclasses.replace(spec.surgery, max_loss_increase=max_loss_increase))
    return trained_run(tmp_path, spec, in_subprocess=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return _trained_run(tmp_path_factory.mktemp("surgery"))


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("surgery.json", "train.lock")}


def test_surgery_then_continue_trains_the_smaller_model(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    assert folder_states(tmp_path, run_dir.name) == ("ok", "ok", "1 ok")
    lines: list[str] = []
    record = operate(run_dir, "0.25", None, say=lines.append)
    assert folder_states(tmp_path, run_dir.name) == ("cut", "cut", "1 cut")  # one word everywhere, not "stopped"
    assert "restore the file" not in (tmp_path / "report.md").read_text()
    assert record["accepted"] and record["source"] == "statistics"
    assert record["removed"] == {"head": 4, "neuron": 512}  # a quarter of 4 layers x (4 heads, 512 neurons)
    assert record["architecture"]["after"] == {"n_layer": 4, "heads": [3] * 4, "mlp": [384] * 4}
    measured = record["measured"]
    for key in ("parameters", "checkpoint_bytes", "optimizer_state_bytes", "training_memory_bytes"):
        assert measured[key]["after"] < measured[key]["before"], key
    assert lines[0].startswith("surgery: checkpoints/milestones/step_00000010.ckpt (step 10): removing 4 heads, "
                               "512 neurons chosen from statistics")
    assert "| parameters |" in lines[1] and lines[2].startswith("surgery accepted: 4 heads, 512 neurons")
    assert (run_dir / "checkpoints" / "before_surgery" / "step_00000010.ckpt").is_file()
    assert not (run_dir / "summary.json").exists() and (run_dir / "summary.before_surgery.json").exists()
    done = subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed"]["from_steps"] == [10]
    assert summary["steps"]["done"] == 20 and summary["surgery"][0]["removed"] == {"head": 4, "neuron": 512}
    assert summary["sparsity"]["total_params"] == measured["parameters"]["after"]
    assert summary["sparsity"]["reached"] == pytest.approx(0.25)  # the removed quarter counts as pruned
    assert summary["sparsity"]["cut_by_surgery"] == pytest.approx(0.25)  # ... and says so
    assert folder_states(tmp_path, run_dir.name) == ("ok", "ok", "1 ok")
    assert "25.0% (25.0% cut by surgery) / 0%" in (tmp_path / "report.md").read_text()
    assert json.loads((run_dir / "surgery.json").read_text())[0]["accepted"] is True
    assert (run_dir / "checkpoints" / "before_surgery" / "best.pt").is_file()  # the uncut model's best, aside
    assert summary["best"]["step"] > 10  # chosen among the cut model's evaluations
    from lib.checkpoint.export import export, load_export

    out = export(run_dir, "hf")
    exported, _ = load_export(out)  # rebuilt from the recorded architecture
    assert sum(p.numel() for p in exported.parameters()) == measured["parameters"]["after"]
    card = json.loads((out / "model_card.json").read_text())
    structure = card["structure"]  # the cut is in the card beside the (near) zero fraction
    assert structure["parameters_as_built"] == measured["parameters"]["before"]
    assert structure["parameters_now"] == measured["parameters"]["after"] < structure["parameters_as_built"]
    assert structure["reduction"] == pytest.approx(1 - structure["parameters_now"] / structure["parameters_as_built"])
    assert "tokenizer" in card["usage"] and "GELU" in card["usage"]["forward"]
    # FORMAT=hf: the cut model (3 of 4 heads, 384 of 512 neurons per layer) padded to GPT2Config's widths
    import transformers

    assert card["hf"]["padded_to_uniform_widths"] == {"heads": [3] * 4, "mlp": [384] * 4, "to_heads": 4,
                                                      "to_mlp": 384}
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out / "hf"), local_files_only=True)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs.eval()(tokens).logits - exported.eval()(tokens)).abs().max() <= 1e-5


def test_rollback_leaves_every_file_byte_identical(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    spec = json.loads((run_dir / "spec.json").read_text())
    spec["surgery"]["max_loss_increase"] = 0.0
    (run_dir / "spec.json").write_text(json.dumps(spec))
    before = _digest(run_dir)
    with pytest.raises(HarnessError, match=r"surgery rolled back: validation loss rose 0\.\d+ .* is untouched"):
        operate(run_dir, "0.5", "neurons")
    assert _digest(run_dir) == before
    assert json.loads((run_dir / "surgery.json").read_text())[-1]["accepted"] is False


@pytest.mark.parametrize("fraction,structure,message", [
    ("0", None, r"FRACTION=0 is outside \(0, 1\)"),
    ("1.5", None, r"FRACTION=1\.5 is outside \(0, 1\)"),
    ("half", None, "FRACTION='half' is not a number"),
    ("0.9", "heads", r"FRACTION=0\.9 would remove all 4 heads of h\.0\.attn; one must stay"),
    ("0.9", "blocks", "would remove all 4 blocks; one must stay"),
    ("0.3", "layers", "surgery structure 'layers' is not one of all, heads"),
    ("0.3", "channels", "GPT has no channels; it has heads, neurons"),
    ("0.01", "heads", "rounds to no whole structure"),
])
def test_bad_fractions_and_structures_are_one_line(trained: Path, tmp_path: Path, fraction, structure,
                                                    message) -> None:
    run_dir = _copy(trained, tmp_path)
    before = _digest(run_dir)
    with pytest.raises(HarnessError, match=message):
        operate(run_dir, fraction, structure)
    assert _digest(run_dir) == before


def test_a_run_without_statistics_or_masks_is_refused(tmp_path: Path) -> None:
    run_dir = _trained_run(tmp_path, structure_stats_every=0, max_iters=12)
    with pytest.raises(HarnessError, match="no structure statistics and no structured masks; train with "
                                           "CONFIG_STRUCTURE_STATS_EVERY"):
        operate(run_dir, None, None)


def test_a_checkpoint_of_another_model_and_other_folders_are_refused(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    spec = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**spec, "model": "lenet5"}))
    with pytest.raises(HarnessError, match="is of model 'gpt2', but the run trains 'lenet5'"):
        operate(run_dir)
    with pytest.raises(HarnessError, match="not a run folder"):
        operate(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spec.json").write_text((trained / "spec.json").read_text())
    with pytest.raises(HarnessError, match="has no training checkpoint .*CONFIG_CKPT_MILESTONE"):
        operate(empty)


def test_structured_runs_are_cut_where_their_masks_are(tmp_path: Path) -> None:
    """With compact optimizer state (issue 29): the cut expands it first; the cut model is exactly the masked one."""
    from lib.checkpoint import load

    prune = PruneSettings(method="structured", target=0.3, start=2, end=6, frequency=2)
    run_dir = _trained_run(tmp_path, prune, max_iters=12, ckpt_interval=4, ckpt_milestone=4, structure_stats_every=0,
                           compact_state=True)
    state = load(run_dir / "checkpoints" / "milestones" / "step_00000008.ckpt")["optimizer"]["state"]
    assert any(s["exp_avg"].dim() == 1 and s["exp_avg"].numel() > 4 * 128 for s in state.values())  # compact
    with pytest.raises(HarnessError, match="masks of this structured run decide what goes; drop FRACTION="):
        operate(run_dir, "0.3", None)
    said: list[str] = []
    record = operate(run_dir, say=said.append)
    assert record["source"] == "masks" and record["step"] == 8  # the newest milestone: the run finished
    written = load(Path(said[-1].split("wrote ")[1].split(" (")[0]))
    shapes = {tuple(t.shape) for t in written["model"].values()}
    assert all(tuple(s["exp_avg"].shape) in shapes for s in written["optimizer"]["state"].values())  # dense
    assert record["val_loss"]["rise"] == pytest.approx(0.0, abs=1e-4)  # exactly the masked model
    assert record["prunable_weights_removed"] >= 0.29 * 4 * 12 * 128 * 128


def test_make_surgery_prints_one_line_on_bad_input(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lib.cli", "surgery", "--run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path}: not a run folder (no spec.json); give "
                                                f"RUN=results/<folder>/<run>"]


def test_the_report_lists_the_surgeries() -> None:
    from lib.results import Run
    from lib.results.report import _surgeries

    entry = {"step": 200, "source": "statistics", "removed": {"head": 4, "neuron": 616},
             "val_loss": {"before": 5.5473, "after": 5.5799}}
    lines = _surgeries([Run({"name": "a", "surgery": [entry]}), Run({"name": "b"})])
    assert "| a | 200 | statistics | 4 heads, 616 neurons | 5.5473 -> 5.5799 |" in lines
    assert not any("| b |" in line for line in lines) and _surgeries([Run({"name": "b"})]) == []


def test_surgery_every_cuts_inside_the_run_and_a_rollback_trains_on_uncut(tmp_path: Path) -> None:
    run_dir = _trained_run(tmp_path / "cut", max_iters=20, surgery_every=10, ckpt_interval=0, ckpt_milestone=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"]["done"] == 20 and "resumed" not in summary
    assert [s["step"] for s in summary["surgery"]] == [10] and summary["surgery"][0]["source"] == "statistics"
    assert summary["sparsity"]["total_params"] < 803_584  # the tiny GPT at vocabulary 256 has 803,584
    run_dir = _trained_run(tmp_path / "uncut", max_loss_increase=0.0, surgery_every=10, ckpt_interval=0,
                           ckpt_milestone=0)
    stdout = (tmp_path / "uncut" / "stdout.txt").read_text()
    assert "gpt2_tiny: no cut at step 10: surgery rolled back: validation loss rose" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and "surgery" not in summary and summary["sparsity"]["total_params"] == 803_584


def test_lenet5_is_cut_through_the_dependency_graph_and_trains_on(tmp_path: Path) -> None:
    from tests.conftest import tiny_spec

    spec = tiny_spec("lenet", max_iters=12, structure_stats_every=2, ckpt_interval=6, ckpt_milestone=6)
    spec = dataclasses.replace(spec, surgery=dataclasses.replace(spec.surgery, max_loss_increase=10.0))
    run_dir = trained_run(tmp_path, spec, in_subprocess=True)
    with pytest.raises(HarnessError, match="LeNet5 has no heads; it has channels, units"):
        operate(run_dir, "0.3", "heads")
    with pytest.raises(HarnessError, match="LeNet5 has no residual blocks to remove"):
        operate(run_dir, "0.3", "blocks")
    record = operate(run_dir, "0.25", "channels", say=lambda line: None)
    assert record["removed"] == {"channel": 6} and record["architecture"]["after"]["conv2"] == 12
    assert subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, timeout=300).returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["surgery"][0]["removed"] == {"channel": 6}


@pytest.mark.parametrize("lines,message", [
    ('CONFIG_SURGERY_FRACTION="1.5"\n', r"CONFIG_SURGERY_FRACTION=1\.5 is outside \(0\.0, 1\.0\)"),
    ('CONFIG_SURGERY_FRACTION="most"\n', "CONFIG_SURGERY_FRACTION='most' is not a number"),
    ('CONFIG_SURGERY_STRUCTURE="layers"\n', "surgery structure 'layers' is not one of all, heads, neurons"),
    ('CONFIG_SURGERY_MAX_LOSS_INCREASE="-1"\n', r"CONFIG_SURGERY_MAX_LOSS_INCREASE=-1 is outside \[0\.0"),
    ("CONFIG_SURGERY_EVERY=50\n", "CONFIG_SURGERY_EVERY has no effect: it depends on STRUCTURE_STATS_EVERY != 0"),
])
def test_bad_surgery_settings_are_one_line(make_config, lines: str, message: str) -> None:
    from lib import config
    from lib.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config.load(make_config("CONFIG_MODEL_LENET5=y\n", extra=lines))  # as a user edits .config


def test_surgery_settings_reach_the_run_spec(make_config) -> None:
    from lib import config, matrix
    from lib.hardware import Devices

    path = make_config('CONFIG_MODEL_LENET5=y\nCONFIG_STRUCTURE_STATS_EVERY=5\nCONFIG_SURGERY_EVERY=50\n'
                       'CONFIG_SURGERY_FRACTION="0.2"\nCONFIG_SURGERY_STRUCTURE="units"\n'
                       'CONFIG_SURGERY_MAX_LOSS_INCREASE="0.1"\n')
    spec = matrix.expand(config.load(path), Devices(kind="cpu", cpu_cores=2))[0]
    assert (spec.train.structure_stats_every, spec.train.surgery_every) == (5, 50)
    assert (spec.surgery.fraction, spec.surgery.structure, spec.surgery.max_loss_increase) == (0.2, "units", 0.1)


def test_surgery_refuses_a_run_being_trained(trained: Path, tmp_path: Path) -> None:
    from lib.core import runlock

    run_dir = _copy(trained, tmp_path)
    before = _digest(run_dir)
    held = runlock.lock(run_dir)  # as a live trainer holds it
    try:
        with pytest.raises(HarnessError, match="is being trained by PID"):
            operate(run_dir, "0.3", None)
    finally:
        os.close(held)
    assert _digest(run_dir) == before


def test_cli_lines_for_missing_run_and_a_continue_folder_that_is_not_one(make_config, tmp_path, capsys) -> None:
    from lib.cli import main

    assert main(["surgery"]) == 2
    assert capsys.readouterr().err.strip() == ("error: surgery needs a run folder: "
                                               "`make surgery RUN=results/<folder>/<run> [FRACTION=0.3]`")
    config = make_config("CONFIG_MODEL_LENET5=y\n")
    assert main(["--config", str(config), "continue", "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path} is not a results folder made by `make` "
                                               f"(no readable matrix.json)")
