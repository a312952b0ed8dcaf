"""lib/train/trainer.py and lib/train/run.py: the loop's guarantees, checked on tiny real LeNet-5 runs."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from lib.checkpoint import load as load_checkpoint
from lib.checkpoint.folder import RunCheckpoints
from lib.core.spec import RunSpec
from lib.core.task import get_task
from lib.train import run as run_mod
from lib.train.trainer import lr_at, planned_steps
from tests.conftest import PY, ROOT, tiny_spec


def _run(spec: RunSpec, tmp_path: Path) -> tuple[dict, Path]:
    run_dir = tmp_path / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    run_mod.run(run_dir)
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(5, 1.0, 100, 10, 0.1) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, 10, 0.1) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(100, 1.0, 100, 10, 0.1) == pytest.approx(0.1)


def test_planned_steps_takes_the_smaller_budget():
    from lib.core.spec import TrainSettings

    assert planned_steps(TrainSettings(batch_size=128, epochs=2), 4000, 128) == (64, 32)
    assert planned_steps(TrainSettings(batch_size=128, epochs=2, max_iters=10), 4000, 128) == (10, 32)


def test_best_checkpoint_is_saved_and_test_is_measured_on_it(tmp_path):
    summary, run_dir = _run(tiny_spec("dense", max_iters=20), tmp_path)
    assert summary["status"] == "ok", summary
    ckpt = load_checkpoint(RunCheckpoints(run_dir).best)
    assert ckpt["step"] == summary["best"]["step"] == summary["test_at_best"]["step"]
    evals = _metrics(run_dir)
    best_val = max(e["val"]["accuracy"] for e in evals)
    assert summary["best"]["val"]["accuracy"] == best_val
    # the test number is reproducible from the checkpoint on disk, so that file really is the best one
    spec = RunSpec.read(run_dir / "spec.json")
    task = get_task("lenet5")
    model = task.build_model(spec)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert task.evaluate(model, spec, "test")["accuracy"] == summary["test_at_best"]["accuracy"]
    assert summary["memory"]["peak_rss_bytes"] > 0
    sb = summary["memory"]["state_bytes"]
    assert sb["weights"] == 61706 * 4 and sb["optimizer_state"] >= 2 * 61706 * 4
    assert summary["throughput"]["value"] > 0 and summary["throughput"]["unit"] == "images/s"
    curve = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [5, 10, 15, 20] and all(c["rss_bytes"] > 0 for c in curve)


def test_best_is_chosen_only_at_target_sparsity(tmp_path):
    spec = tiny_spec("pruned", pruning="magnitude", sparsity=0.7, max_iters=30, prune={"end": 20})
    summary, run_dir = _run(spec, tmp_path)
    assert summary["status"] == "ok" and not summary["flags"]
    assert abs(summary["sparsity"]["reached"] - 0.7) <= 0.005
    first_at_target = min(e["step"] for e in _metrics(run_dir) if e["sparsity"] >= 0.695)
    assert summary["best"]["step"] >= first_at_target
    assert summary["sparsity"]["prunable_params"] == 61470  # conv and linear weights, no biases


def test_sparsity_missed_trips_when_the_schedule_is_cut_short(tmp_path):
    spec = tiny_spec("short", pruning="magnitude", sparsity=0.9, max_iters=12, prune={"end": 1000})
    summary, _ = _run(spec, tmp_path)
    assert summary["status"] == "ok"
    assert "sparsity_missed" in summary["flags"]
    assert summary["sparsity"]["reached"] < 0.9 - 0.005
    assert summary["best"] is None and summary["test_at_best"] is None  # never at target: nothing to report


def test_nan_loss_marks_the_run_diverged(tmp_path):
    spec = tiny_spec("nan", optimizer="sgd", lr=1e30, grad_clip=0.0, max_iters=20)
    summary, _ = _run(spec, tmp_path)
    assert summary["status"] == "diverged"
    assert "became" in summary["error"]


def test_same_seed_repeats_to_the_bit(tmp_path):
    a, dir_a = _run(tiny_spec("a", max_iters=10, seed=3), tmp_path)
    b, dir_b = _run(tiny_spec("b", max_iters=10, seed=3), tmp_path)
    c, _ = _run(tiny_spec("c", max_iters=10, seed=4), tmp_path)
    losses = [[e["train_loss"] for e in _metrics(d)] for d in (dir_a, dir_b)]
    assert losses[0] == losses[1]
    assert a["best"]["val"] == b["best"]["val"]
    assert a["best"]["val"] != c["best"]["val"]


def test_a_rerun_in_a_new_process_is_bit_identical(tmp_path):
    """What the README promises for CONFIG_DETERMINISTIC: the same machine and thread count repeat a run
    to the bit, in a fresh process (as `make` reruns it), weights and every logged metric included."""
    spec = tiny_spec("pruned", pruning="magnitude", sparsity=0.7, max_iters=20, seed=5)
    dirs = []
    for name in ("first", "again"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        spec.write(run_dir / "spec.json")
        subprocess.run([PY, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, check=True, capture_output=True,
                       timeout=300)
        dirs.append(run_dir)
    a, b = (load_checkpoint(RunCheckpoints(d).best)["model"] for d in dirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time", "elapsed", "wall", "throughput", "rss", "memory")
    def logged(d: Path) -> list:
        return [{k: v for k, v in e.items() if not any(w in k for w in drop)} for e in _metrics(d)]
    assert logged(dirs[0]) == logged(dirs[1])
    first, again = (json.loads((d / "summary.json").read_text()) for d in dirs)
    assert first["best"] == again["best"] and first["test_at_best"] == again["test_at_best"]


def test_time_budget_fixes_the_step_count(tmp_path):
    spec = tiny_spec("timed", max_iters=0, epochs=0, time_budget_s=2.0)
    summary, _ = _run(spec, tmp_path)
    assert summary["status"] == "ok"
    steps = summary["steps"]
    assert steps["done"] == steps["planned"] and 5 <= steps["planned"] < 10**6
    assert summary["wall_time_s"] < 2.0 * 3 + 5  # bounded by the budget, with evaluation overhead


def test_a_raising_run_is_recorded_as_failed(tmp_path):
    spec = tiny_spec("bad")
    bad = RunSpec.from_dict({**spec.to_dict(), "model": "nosuchmodel"})
    summary, _ = _run(bad, tmp_path)
    assert summary["status"] == "failed"
    assert "unknown model 'nosuchmodel'" in summary["error"]
    provenance = summary["provenance"]  # a failed run still says what made it; only the data is unknown
    assert provenance["commit"] and "unknown model 'nosuchmodel'" in provenance["data"]["error"]


def test_missing_dataset_fails_with_the_prepare_data_command(tmp_path):
    spec = tiny_spec("nodata")
    spec = RunSpec.from_dict({**spec.to_dict(), "model_options": {"dataset": "mnist"}, "data_dir": str(tmp_path)})
    summary, _ = _run(spec, tmp_path)
    assert summary["status"] == "failed" and "make prepare-data" in summary["error"]
    assert "\n" not in summary["error"]


def test_summary_numbers_are_finite(tmp_path):
    summary, _ = _run(tiny_spec("finite", max_iters=10), tmp_path)
    assert math.isfinite(summary["best"]["val"]["loss"]) and summary["wall_time_s"] > 0


def test_bf16_autocast_run_on_cpu(tmp_path):
    spec = tiny_spec("bf16", max_iters=10)
    spec = RunSpec.from_dict({**spec.to_dict(), "hardware": {**spec.to_dict()["hardware"], "dtype": "bfloat16"}})
    summary, _ = _run(spec, tmp_path)
    assert summary["status"] == "ok" and math.isfinite(summary["best"]["val"]["loss"])


def test_time_budget_with_fractional_schedule_still_prunes(tmp_path):
    """The step count is fixed after probing; a fractional schedule must be re-sized to it, not to 10**9."""
    spec = tiny_spec("timed_pruned", pruning="magnitude", sparsity=0.5, max_iters=0, epochs=0, time_budget_s=3.0,
                     prune={"start": 0.1, "end": 0.6})
    summary, _ = _run(spec, tmp_path)
    assert summary["status"] == "ok", summary
    assert abs(summary["sparsity"]["reached"] - 0.5) <= 0.005 and "sparsity_missed" not in summary["flags"]
