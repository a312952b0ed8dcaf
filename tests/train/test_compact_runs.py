"""Compact optimizer state in real runs (issue 29): bit-identical to dense state, resumable either way.

LeNet-5 and the tiny GPT, AdamWPrune with bitter7 state pruning and magnitude pruning with AdamW: the
compact run logs the same metrics and writes the same weights and (once expanded) the same moments at
every milestone as the dense run, in a fraction of the optimizer memory. A compact checkpoint resumes
bit-identically, and a run configured without compact state converts it, saying so in one line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lib.checkpoint import load
from lib.checkpoint.compare import logs, run_differences
from lib.core.task import get_task
from lib.surgery.command import Trained
from lib.train import run as run_mod
from lib.train import trainer
from tests.conftest import synthetic_spec, tiny_spec, trained_run

METHODS = {"bitter7": ("adamwprune", "state", "bitter7"), "magnitude-adamw": ("adamw", "magnitude", "")}


def _trained(folder: Path, spec) -> Path:  # noqa: ANN001 (a RunSpec)
    folder.mkdir(parents=True)
    return trained_run(folder, spec)


def _spec(model: str, method: str, compact_state: bool, tmp_path: Path, name: str):  # noqa: ANN202 (a RunSpec)
    optimizer, pruning, variant = METHODS[method]
    train = {"keep_checkpoints": True, "ckpt_interval": 4, "ckpt_milestone": 4, "log_interval": 1}
    base = tiny_spec(name, max_iters=16, **train) if model == "lenet5" else synthetic_spec(
        tmp_path, name=name, max_iters=12, **train)
    return dataclasses.replace(
        base, optim=dataclasses.replace(base.optim, name=optimizer, compact_state=compact_state,
                                        base="adamw" if optimizer == "adamwprune" else ""),
        prune=dataclasses.replace(base.prune, method=pruning, target=0.9, start=2, end=6, frequency=2,
                                  variant=variant),
        hardware=dataclasses.replace(base.hardware, fused_step=True))


def _dense_state(spec, payload: dict) -> dict:  # noqa: ANN001 (a RunSpec)
    """The checkpoint's optimizer state dict with compact moments expanded under the pruner's masks (as surgery
    loads a checkpoint, lib/surgery/command.py)."""
    trained = Trained.build(get_task(spec.model), spec, None).load(payload)
    return trained.optimizer.state_dict()["state"]


@pytest.mark.parametrize("model", ["lenet5", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_compact_state_is_the_dense_run_to_the_bit(model: str, method: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    dense = _trained(tmp_path / "dense", _spec(model, method, False, tmp_path, "run"))
    spec = _spec(model, method, True, tmp_path, "run")
    mine = _trained(tmp_path / "compact", spec)
    assert "compact state from step 6: the moments of" in capsys.readouterr().out
    assert logs(dense) == logs(mine)
    milestones = sorted((dense / "checkpoints" / "milestones").glob("*.ckpt"))
    assert len(milestones) >= 2
    shrunk = 0
    for path in milestones:
        a, b = load(path), load(mine / "checkpoints" / "milestones" / path.name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        ours = _dense_state(spec, b)
        for index, state in a["optimizer"]["state"].items():
            shrunk += b["optimizer"]["state"][index]["exp_avg"].numel() < state["exp_avg"].numel()
            assert all(torch.equal(value, ours[index][key]) for key, value in state.items()), (path.name, index)
    assert shrunk  # some milestone really held compact state
    memory = [json.loads((d / "summary.json").read_text())["memory"]["state_bytes"] for d in (dense, mine)]
    assert memory[1]["optimizer_state"] < memory[0]["optimizer_state"] / 3


def _stopped_at(run_dir: Path, spec, step: int, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    calls = {"n": 0}

    def stop(shard):  # noqa: ANN001, ANN202 - the trainer asks once per step
        calls["n"] += 1
        return 15 if calls["n"] == step else 0

    run_dir.mkdir(parents=True)
    spec.write(run_dir / "spec.json")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_stop_agreed", stop)
        assert run_mod.run(run_dir) == run_mod.STOPPED_EXIT


@pytest.fixture
def _unlocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several runs of one folder in this process: its first run's lock (held for the process's life) is not
    what these tests are about."""
    monkeypatch.setattr(run_mod.runlock, "lock_for_child", lambda run_dir: -1)


@pytest.mark.usefixtures("_unlocked")
def test_a_compact_checkpoint_resumes_to_the_bit_or_converts_in_one_line(tmp_path: Path, monkeypatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    spec = _spec("lenet5", "bitter7", True, tmp_path, "run")
    reference = _trained(tmp_path / "reference", spec)
    resumed = tmp_path / "resumed" / "run"
    _stopped_at(resumed, spec, 9, monkeypatch)  # after compaction at step 6
    saved = load(resumed / "checkpoints" / "step_00000009.ckpt")
    assert any(s["exp_avg"].dim() == 1 and s["exp_avg"].numel() < 2500 for s in saved["optimizer"]["state"].values())
    capsys.readouterr()
    assert run_mod.run(resumed) == 0
    assert "resuming" in capsys.readouterr().out
    assert run_differences(reference, resumed) == []

    converted = tmp_path / "converted" / "run"
    _stopped_at(converted, spec, 9, monkeypatch)
    dense_spec = dataclasses.replace(spec, optim=dataclasses.replace(spec.optim, compact_state=False))
    dense_spec.write(converted / "spec.json")
    capsys.readouterr()
    assert run_mod.run(converted) == 0
    out = capsys.readouterr().out
    assert out.count("expanded to dense") == 1 and "configured without CONFIG_COMPACT_STATE" in out
    assert logs(reference) == logs(converted)
    final = load(sorted((converted / "checkpoints" / "milestones").glob("*.ckpt"))[-1])
    shapes = {tuple(t.shape) for t in final["model"].values()}
    assert all(tuple(s["exp_avg"].shape) in shapes for s in final["optimizer"]["state"].values())  # dense again
