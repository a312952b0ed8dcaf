"""`make sweep` (lib/sweep/oneshot.py): one-shot rows on a real checkpoint, read-only; the recommendation rule;
the perplexity path; a results folder; every bad input in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib import config
from lib.checkpoint.folder import RunCheckpoints
from lib.core.errors import ConfigError, HarnessError
from lib.core.spec import SweepSettings
from lib.core.task import Metric
from lib.pruning.threshold import prune_count
from lib.sweep.oneshot import buys, overall, recommend, sweep_results, sweep_run
from lib.sweep.report import recommendation_lines
from tests.conftest import ROOT, synthetic_spec, tiny_spec, trained_run

LENET_PRUNABLE = 6 * 25 + 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.mktemp("sweep"), tiny_spec("lenet5_adamw_none_0", max_iters=20))


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


QUIET = {"CALIBRATION": "2"}


def _val_pruned_by_torch(run_dir: Path, target: float) -> dict[str, float]:
    """The run's best weights, pruned by torch.nn.utils.prune's global magnitude pruning to ``target``, evaluated
    on the validation split: what a one-shot magnitude row must report."""
    import torch
    from torch.nn.utils import prune

    from lib.checkpoint import load
    from lib.core.spec import RunSpec
    from lib.core.task import get_task

    spec = RunSpec.read(run_dir / "spec.json")
    task = get_task(spec.model)
    model = task.build_model(spec)
    model.load_state_dict(load(RunCheckpoints(run_dir).best)["model"])
    weights = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sum(m.weight.numel() for m, _ in weights) == LENET_PRUNABLE
    if target:
        prune.global_unstructured(weights, prune.L1Unstructured, amount=prune_count(LENET_PRUNABLE, target))
        for module, name in weights:
            prune.remove(module, name)
    with torch.no_grad():
        return task.evaluate(model.eval(), spec, "val")


def test_one_shot_rows_reach_their_targets_and_leave_the_checkpoint_untouched(lenet: Path) -> None:
    before = _digests(lenet / "checkpoints")
    lines: list[str] = []
    record = sweep_run(lenet, {**QUIET, "SPARSITIES": "30,50,70"}, say=lines.append)
    assert _digests(lenet / "checkpoints") == before  # byte for byte
    best = RunCheckpoints(lenet).best.read_bytes()
    assert record["checkpoint"]["sha256"] == hashlib.sha256(best).hexdigest()
    rows = record["rows"]
    assert len(rows) == 3 * 3 + 3 + 3 * 3  # unstructured and structured x metrics x sparsities, 2:4 once per metric
    for row in rows:
        if row["pattern"] == "unstructured":
            assert row["reached"] == row["reached_all"] == prune_count(LENET_PRUNABLE, row["target"]) / LENET_PRUNABLE
        elif row["pattern"] == "2:4":
            assert row["reached"] == 0.5  # exactly, over the layers 4 divides
            assert row["dense_layers"] == {"conv1.weight": 25, "conv2.weight": 150}
            assert row["reached_all"] == pytest.approx(0.5 * (LENET_PRUNABLE - 2550) / LENET_PRUNABLE)
            assert row["size"]["stored_bytes"] < record["dense"]["size"]["dense_bytes"]
        else:  # structured: physically smaller, within half a unit of the target (a conv2 channel and its
            # fc1 columns are 3150 weights, 5.1 %)
            assert row["size"]["parameters"] < record["dense"]["size"]["parameters"]
            assert row["reached_all"] == pytest.approx(row["target"], abs=0.026)
        assert row["speed"]["latency_ms_batch_1"] > 0 and row["speed"]["dense_latency_ms_batch_1"] > 0
    unstructured_30 = next(r for r in rows if r["pattern"] == "unstructured" and r["target"] == 0.3)
    assert unstructured_30["size"]["nonzero"] < record["dense"]["size"]["nonzero"]
    assert record["dense"]["val"] == _val_pruned_by_torch(lenet, 0.0)
    for row in (r for r in rows if r["pattern"] == "unstructured" and r["metric"] == "magnitude"):
        assert row["val"] == _val_pruned_by_torch(lenet, row["target"]), row["target"]  # metric of that model
    out = lenet / "sweep"
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.md", "sweep.png"}
    assert json.loads((out / "sweep.json").read_text())["rows"] == json.loads(json.dumps(rows))
    text = (out / "sweep.md").read_text()
    assert "| 2:4 | magnitude | 50 % |" in text
    assert "recommended (at most 1 points of accuracy below dense, whose val accuracy is" in text
    assert "give no speed-up here" in text  # the CPU says so
    if record["overall"] is not None:
        assert set(record["overall"]["test"]) == {"loss", "accuracy"}
    assert any(line.startswith("recommended") for line in lines)


def test_rows_below_the_checkpoints_own_sparsity_are_skipped(tmp_path: Path) -> None:
    run_dir = trained_run(tmp_path, tiny_spec("pruned", pruning="magnitude", sparsity=0.5))
    record = sweep_run(run_dir, {"SPARSITIES": "30,70", "METRICS": "magnitude", "PATTERNS": "unstructured,2:4"},
                       say=lambda _: None)
    skipped = {(r["pattern"], r["target"]): r.get("skipped") for r in record["rows"]}
    assert skipped[("unstructured", 0.3)] == "the checkpoint is already 50.0 % sparse"
    assert skipped[("2:4", 0.5)] == "the checkpoint is already 50.0 % sparse"
    assert skipped[("unstructured", 0.7)] is None


def test_a_perplexity_task_sweeps_and_recommends(tmp_path: Path) -> None:
    run_dir = trained_run(tmp_path, synthetic_spec(tmp_path, max_iters=20))
    record = sweep_run(run_dir, {"SPARSITIES": "20,90", "METRICS": "magnitude,activation",
                                 "PATTERNS": "2:4,structured", "CALIBRATION": "2", "TOLERANCE": "50"},
                       say=lambda _: None)
    assert record["metric"]["name"] == "perplexity" and record["tolerance"] == "perplexity at most 50 % above dense"
    structured = [r for r in record["rows"] if r["pattern"] == "structured" and "val" in r]
    assert structured and all(r["size"]["parameters"] < record["dense"]["size"]["parameters"] for r in structured)
    assert all(r["reached"] == 0.5 for r in record["rows"] if r["pattern"] == "2:4")
    assert "| structured | magnitude | 20 % |" in (run_dir / "sweep" / "sweep.md").read_text()


def test_a_2_of_4_rows_sparse_kernel_timing_is_shown_beside_its_dense_kernel_timing(lenet: Path, monkeypatch,
                                                                                      tmp_path: Path) -> None:
    """The sweep's own path for a GPU with 2:4 kernels, run on the CPU: the float16 pair is built and timed
    against its float16 dense twin (the CPU converts no layer, and says so), and the row's line in sweep.md shows
    those measured numbers beside the dense-kernel timing; a conversion that fails is recorded, not hidden."""
    from lib.sweep import measure as sweep_measure
    from lib.sweep.report import markdown

    run_dir = tmp_path / "run"
    shutil.copytree(lenet, run_dir)
    monkeypatch.setattr(sweep_measure, "semi_structured_ok", lambda device: True)
    options = {"SPARSITIES": "50", "METRICS": "magnitude", "PATTERNS": "2:4", "CALIBRATION": "0"}
    row = sweep_run(run_dir, options, say=lambda _: None)["rows"][0]
    sparse, dense = row["speed_sparse_kernels"], row["speed"]
    assert sparse["kernels"] == "semi-structured sparse, float16, 0 Linear layer(s)"  # none on the CPU
    assert sparse["latency_ms_batch_1"] > 0 and sparse["dense_latency_ms_batch_1"] > 0
    assert sparse["timing_batch_1"]["sides"][0]["repeats"] >= 5  # measured, side by side, not typed in ...
    assert sparse["dense_latency_ms_batch_1"] != dense["dense_latency_ms_batch_1"]  # ... apart from the float32 pair
    line = next(x for x in (run_dir / "sweep" / "sweep.md").read_text().splitlines() if x.startswith("| 2:4 |"))
    assert f"{dense['latency_ms_batch_1']:.2f} ms ({dense['speedup_batch_1']:.2f}x)" in line
    assert f"2:4 kernels (semi-structured sparse, float16, 0 Linear layer(s)): {sparse['speedup_batch_1']:.2f}x " \
           f"at batch 1" in line

    def refused(*args, **kwargs):
        raise RuntimeError("shape too small for the 2:4 kernels")

    monkeypatch.setattr(sweep_measure, "semi_structured_pair", refused)
    record = sweep_run(run_dir, options, say=lambda _: None)
    assert record["rows"][0]["speed_sparse_kernels"] == {"error": "shape too small for the 2:4 kernels"}
    assert "2:4 kernels failed: shape too small for the 2:4 kernels" in markdown(record)


def test_int8_rows_measure_quality_size_and_cpu_latency_after_pruning(lenet: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(lenet, run_dir)
    options = {"SPARSITIES": "90", "METRICS": "magnitude", "PATTERNS": "unstructured,2:4,structured",
               "CALIBRATION": "0", "QUANT": "int8"}
    record = sweep_run(run_dir, options, say=lambda _: None)
    assert record["settings"]["int8"] and "int8" in record["dense"]
    for row in [record["dense"], *record["rows"]]:
        int8 = row["int8"]
        assert int8["layers"] == 3 and 0 <= int8["val"]["accuracy"] <= 100
        assert int8["size"]["stored_bytes"] < row["size"]["stored_bytes"]  # a byte per Linear weight, not four
        assert int8["size"]["parameters"] == row["size"]["parameters"]
        assert int8["speed"]["timing_batch_1"]["sides"][0]["repeats"] >= 5 and int8["speed"]["latency_ms_batch_1"] > 0
    unstructured = record["rows"][0]
    assert unstructured["int8"]["zeros_kept"] >= 0.85 * (400 * 120 + 120 * 84 + 84 * 10)  # 90 % of the Linear weights
    table = (run_dir / "sweep" / "sweep.md").read_text().split("## After int8")[1]
    value = unstructured["int8"]["val"]["accuracy"]
    assert f"| unstructured | magnitude | 90 % | {unstructured['val']['accuracy']:.2f} | {value:.2f} |" in table
    assert table.count("\n| ") == 1 + 1 + 3  # the header, dense and the three rows


ACC = Metric("accuracy", True, "%")
PPL = Metric("perplexity", False)


def _row(pattern: str, target: float, value: float, name: str = "accuracy", metric: str = "magnitude",
         reached: float | None = None) -> dict:
    return {"pattern": pattern, "metric": metric, "target": target, "reached_all": reached or target,
            "val": {name: value}}


def test_the_recommendation_is_the_highest_sparsity_within_tolerance_per_pattern() -> None:
    rows = [_row("unstructured", 0.3, 97.9), _row("unstructured", 0.5, 97.0), _row("unstructured", 0.7, 96.9),
            _row("unstructured", 0.9, 80.0), _row("unstructured", 0.5, 97.5, metric="activation"),
            _row("2:4", 0.5, 96.0, reached=0.48), _row("structured", 0.3, 97.2), _row("structured", 0.5, 90.0),
            {"pattern": "structured", "metric": "magnitude", "target": 0.9, "skipped": "beyond"}]
    picks = recommend(rows, 98.0, ACC, SweepSettings(tolerance_accuracy=1.0))
    assert picks == {"unstructured": 4, "2:4": None, "structured": 6}  # 0.7 is 1.1 points down; at 0.5 the better
    assert overall(rows, picks, ACC) == 4
    assert overall(rows, {"unstructured": None, "2:4": None}, ACC) is None


def test_perplexity_tolerance_is_a_percentage_and_ties_take_the_better_value() -> None:
    rows = [_row("unstructured", 0.5, 104.9, "perplexity"), _row("unstructured", 0.7, 105.1, "perplexity"),
            _row("2:4", 0.5, 103.0, "perplexity", reached=0.5)]
    picks = recommend(rows, 100.0, PPL, SweepSettings(tolerance_perplexity=5.0))
    assert picks == {"unstructured": 0, "2:4": 2}
    assert overall(rows, picks, PPL) == 2  # same sparsity reached: the lower perplexity


def test_a_results_folder_is_swept_run_by_run_with_one_combined_graph(lenet: Path, tmp_path: Path) -> None:
    folder = tmp_path / "results_x"
    folder.mkdir()
    shutil.copytree(lenet, folder / lenet.name)
    broken = folder / "no_best"
    shutil.copytree(lenet, broken)
    RunCheckpoints(broken).best.unlink()
    entries = [json.loads((folder / lenet.name / "summary.json").read_text())]
    entries.append({**entries[0], "name": "no_best"})
    (folder / "summary.json").write_text(json.dumps({"runs": entries}))
    lines: list[str] = []
    with pytest.raises(HarnessError, match=r"sweep: 1 of 2 run\(s\) could not be swept: no_best"):
        sweep_results(folder, {"SPARSITIES": "50", "METRICS": "magnitude", "PATTERNS": "unstructured"},
                      say=lines.append)
    assert (folder / "graphs" / "sweep.png").is_file() and "## lenet5_adamw_none_0" in (folder / "sweep.md").read_text()
    assert any(line.startswith("sweep: no_best skipped:") and "no best checkpoint" in line for line in lines)


@pytest.mark.parametrize(("given", "message"), [
    ({"SPARSITIES": "0,50"}, "SPARSITIES: sparsity 0 % is outside (0, 100) %; give e.g. 30,50,70,90"),
    ({"SPARSITIES": "100"}, "SPARSITIES: sparsity 100 % is outside (0, 100) %"),
    ({"SPARSITIES": "0.5"}, "SPARSITIES: sparsities are percentages; write 50, not 0.5"),
    ({"METRICS": "snip"}, "METRICS: unknown importance metric 'snip'; valid: magnitude, gradient-sensitivity, "
                          "activation"),
    ({"PATTERNS": "blocky"}, "PATTERNS: unknown pattern 'blocky'; valid: unstructured, structured or N:M such as 2:4"),
    ({"PATTERNS": "4:4"}, "N:M pattern 4:4 (PATTERNS=): N must be at least 1 and below M"),
    ({"PATTERNS": "1:9"}, "N:M sparsity 1:9: M=9 divides the input dimension of none of LeNet5's prunable layers "
                          "(conv1.weight (25), conv2.weight (150), fc1.weight (400), fc2.weight (120), ...)"),
    ({"CALIBRATION": "1000"}, "sweep: 1000 calibration batches x micro-batch 32 = 32000 examples, but lenet5's "
                              "training split holds 4000; give CALIBRATION=125 or fewer"),
    ({"CALIBRATION": "0"}, "sweep: gradient-sensitivity, activation need calibration batches, and CALIBRATION is 0"),
    ({"TOLERANCE": "-1"}, "TOLERANCE=-1 is negative"),
])
def test_bad_sweep_settings_are_one_line_and_write_nothing(lenet: Path, tmp_path: Path, given: dict,
                                                           message: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(lenet, run_dir, ignore=shutil.ignore_patterns("sweep"))
    with pytest.raises(ConfigError) as info:
        sweep_run(run_dir, given, say=lambda _: None)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (run_dir / "sweep").exists()


def test_make_sweep_without_a_best_checkpoint_or_a_run_is_one_line(lenet: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(lenet, run_dir)
    RunCheckpoints(run_dir).best.unlink()
    for args, expected in (
            (["--run", str(run_dir)], f"error: {run_dir} has no best checkpoint ({run_dir}/checkpoints/best.pt is "
                                      f"missing: the run did not reach an eligible evaluation, is unfinished, or ran "
                                      f"with CONFIG_KEEP_CHECKPOINTS off); nothing to sweep"),
            ([], "error: sweep needs a run or a results folder: `make sweep RUN=results/<folder>/<run>` or "
                 "`make sweep RESULTS=results/<folder>`"),
            (["--run", str(tmp_path)], f"error: {tmp_path}: not a run folder (no spec.json); give "
                                       f"RUN=results/<folder>/<run>")):
        done = subprocess.run([sys.executable, "-m", "lib.cli", "sweep", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [expected]


def test_sweep_settings_reach_the_run_spec_and_bad_ones_are_one_line(make_config) -> None:
    from lib import matrix
    from lib.hardware import Devices

    lines = ("CONFIG_MODEL_LENET5=y\nCONFIG_SWEEP_SPARSITIES=\"20, 40\"\n"
             "CONFIG_SWEEP_METRICS=\"gradient_sensitivity\"\nCONFIG_SWEEP_PATTERNS=\"1:4,structured\"\nCONFIG_SWEEP_CALIBRATION_BATCHES=3\n"
             "CONFIG_SWEEP_TOLERANCE_ACCURACY=\"0.5\"\nCONFIG_SWEEP_INT8=y\n")
    spec = matrix.expand(config.load(make_config(lines)), Devices("cpu", cpu_cores=2))[0]
    assert spec.sweep == SweepSettings((0.2, 0.4), ("gradient-sensitivity",), ("1:4", "structured"), 3, 0.5, 5.0, True)
    with pytest.raises(ConfigError, match=r"^CONFIG_SWEEP_PATTERNS: unknown pattern 'dense'"):
        config.load(make_config("CONFIG_MODEL_LENET5=y\nCONFIG_SWEEP_PATTERNS=\"dense\"\n"))


def _sized(pattern: str, target: float, value: float, parameters: int, speedup: float, reliable: bool = True,
           reached: float | None = None) -> dict:
    speed = {"speedup_batch_1": speedup, "speedup_batch_16": speedup, "reliable": reliable,
             "unreliable_why": "" if reliable else "load average 6.0 on 2 core(s)"}
    return {**_row(pattern, target, value, reached=reached), "size": {"parameters": parameters,
                                                                      "stored_bytes": parameters * 4},
            "speed": speed}


DENSE_ROW = {"size": {"parameters": 1000, "dense_bytes": 4000}, "val": {"accuracy": 98.0}}


def test_the_overall_pick_prefers_a_pattern_that_buys_something_measured() -> None:
    rows = [_sized("unstructured", 0.5, 97.9, 1000, 1.00, reached=0.55),  # zeros stored densely: buys nothing
            _sized("structured", 0.5, 97.5, 520, 1.08, reached=0.50)]  # half the parameters, and faster
    picks = recommend(rows, 98.0, ACC, SweepSettings(tolerance_accuracy=1.0))
    assert overall(rows, picks, ACC, DENSE_ROW) == 1
    noisy = [rows[0], {**rows[1], "speed": {**rows[1]["speed"], "reliable": False}}]
    assert overall(noisy, picks, ACC) == 0  # nothing bought that is known: the higher sparsity, as before
    assert buys(rows[0], DENSE_ROW) == []
    assert buys(rows[1], DENSE_ROW) == ["parameters 1,000 -> 520 (0.52x)", "throughput 1.08x"]


def test_an_unreliable_speed_up_buys_nothing() -> None:
    fast_but_noisy = _sized("2:4", 0.5, 97.8, 1000, 1.50, reliable=False, reached=0.48)
    plain = _sized("unstructured", 0.5, 97.9, 1000, 1.00, reached=0.5)
    assert buys(fast_but_noisy, DENSE_ROW) == []
    picks = recommend([plain, fast_but_noisy], 98.0, ACC, SweepSettings(tolerance_accuracy=1.0))
    assert overall([plain, fast_but_noisy], picks, ACC, DENSE_ROW) == 0  # the higher sparsity decides
    assert buys({**fast_but_noisy, "speed": {**fast_but_noisy["speed"], "reliable": True}}, DENSE_ROW) == [
        "throughput 1.50x"]


def test_the_recommendation_says_what_the_pick_buys(lenet: Path) -> None:
    record = sweep_run(lenet, {"SPARSITIES": "50", "METRICS": "magnitude", "PATTERNS": "unstructured,structured"},
                       say=lambda _: None)
    text = recommendation_lines(record)
    assert "what it buys here: " in text
    row = record["rows"][record["overall"]["row"]]
    for key in ("timing_batch_1", "timing_batch_16"):  # every timing keeps its spread and the load
        t = row["speed"][key]
        assert {"sides", "load_avg_1min", "cores", "reliable", "why"} <= set(t)
        assert all(s["median_ms"] > 0 and s["iqr_ms"] >= 0 and s["repeats"] >= 7 for s in t["sides"])
    if row["pattern"] == "structured":
        assert "parameters " in text
