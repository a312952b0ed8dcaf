"""Probe mode (lib/train/probe.py): halve the micro-batch on out-of-memory before training, and record it.

A CPU has no GPU allocator to exhaust, so out-of-memory is simulated: the task's
loss raises torch.OutOfMemoryError (what CUDA raises) above a micro-batch limit.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lib.core.errors import HarnessError
from lib.core.task import get_task
from lib.train import probe
from lib.train import run as run_mod
from tests.conftest import tiny_spec


@pytest.fixture
def oom_above(monkeypatch):
    """oom_above(n): LeNet-5's loss raises out-of-memory for batches larger than n."""
    task = get_task("lenet5")
    real_loss = task.loss
    seen = []

    def limit(n: int) -> list[int]:
        def loss(model, batch):
            seen.append(len(batch[0]))
            if len(batch[0]) > n:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {n})")
            return real_loss(model, batch)

        monkeypatch.setattr(task, "loss", loss)
        return seen

    return limit


def probed_spec(micro: int, accum: int, **kw):
    spec = tiny_spec(batch_size=micro * accum, **kw)
    return dataclasses.replace(spec, hardware=dataclasses.replace(spec.hardware, micro_batch=micro,
                                                                  grad_accum=accum, probe=True))


def test_probe_halves_until_it_fits(oom_above):
    oom_above(20)
    spec = probed_spec(64, 4)
    task = get_task("lenet5")
    model = task.build_model(spec)
    plan, tries = probe.fit_micro_batch(task, model, spec, torch.device("cpu"), _no_autocast)
    assert [t["micro_batch"] for t in tries] == [64, 32, 16]
    assert [t["fits"] for t in tries] == [False, False, True]
    assert (plan.micro_batch, plan.grad_accum) == (16, 16)  # effective batch 256 kept
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


def test_probe_keeps_divisors_of_the_batch(oom_above):
    oom_above(50)
    spec = probed_spec(96, 2)  # per-rank batch 192: 96 -> 48 (divides 192)
    task = get_task("lenet5")
    plan, tries = probe.fit_micro_batch(task, task.build_model(spec), spec, torch.device("cpu"), _no_autocast)
    assert plan.micro_batch == 48 and plan.micro_batch * plan.grad_accum == 192


def test_probe_gives_up_at_one_with_a_clear_line(oom_above):
    oom_above(0)
    spec = probed_spec(4, 1)
    task = get_task("lenet5")
    with pytest.raises(HarnessError, match="does not fit on cpu even at micro-batch 1"):
        probe.fit_micro_batch(task, task.build_model(spec), spec, torch.device("cpu"), _no_autocast)


def test_probe_in_a_real_run_is_recorded(oom_above, tmp_path):
    seen = oom_above(16)
    spec = probed_spec(32, 2, max_iters=6)
    run_dir = tmp_path / "probe"
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert run_mod.run(run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    hw = summary["hardware"]
    assert hw["planned_micro_batch"] == 32 and (hw["micro_batch"], hw["grad_accum"]) == (16, 4)
    assert hw["probe"] == [{"micro_batch": 32, "fits": False}, {"micro_batch": 16, "fits": True}]
    assert max(seen[2:]) == 16  # training used the probed micro-batch only


def test_probe_off_records_nothing(tmp_path):
    spec = tiny_spec(max_iters=4)
    run_dir = tmp_path / "plain"
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    run_mod.run(run_dir)
    hw = json.loads((run_dir / "summary.json").read_text())["hardware"]
    assert hw["probe"] == [] and hw["micro_batch"] == spec.hardware.micro_batch


class _no_autocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
