"""Structure statistics during training: lib/surgery/stats.py.
(issue 14; docs/algorithms.md, "Structure statistics")"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lenet5.model import LeNet5
from lib.checkpoint import state as ckpt_state
from lib.surgery.stats import StructureStats
from lib.train import run as run_mod
from resnet.model import resnet18
from tests.conftest import tiny_spec


def _lenet_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).logsumexp(-1).mean().backward()


def test_a_silent_channel_scores_zero_and_every_hook_is_removed() -> None:
    torch.manual_seed(0)
    model = LeNet5()
    with torch.no_grad():
        model.conv1.weight[2].zero_()
        model.conv1.bias[2] = -1.0  # relu(-1) = 0: channel 2 feeds conv2 nothing
    stats = StructureStats(model, every=2)
    x = torch.randn(8, 1, 32, 32)
    for step in range(1, 5):
        _lenet_step(model, x)
        if stats.due(step):
            stats.record(lambda: model(x))
    assert stats.count == 2
    channels = [u for u in stats.units if u.group == "conv1"]
    scores = [stats.score(u) for u in channels]
    assert scores[2] == 0.0 and min(s for i, s in enumerate(scores) if i != 2) > 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_recording_leaves_batch_norm_and_the_mode_alone() -> None:
    model = resnet18()
    model.train()
    stats = StructureStats(model, every=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats.record(lambda: model(torch.randn(2, 3, 32, 32)))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert stats.block_score(stats.blocks[0].name) > 0  # a block that changes its input
    assert all(float(t.sum()) > 0 for t in stats.act.values())


def _recorded_lenet() -> tuple[nn.Module, StructureStats]:
    model = LeNet5()
    stats = StructureStats(model, every=1)
    x = torch.randn(4, 1, 32, 32)
    _lenet_step(model, x)
    stats.record(lambda: model(x))
    return model, stats


def test_state_round_trips_and_refuses_another_shape() -> None:
    model, stats = _recorded_lenet()
    again = StructureStats(model, every=1)
    again.load_state_dict(stats.state_dict())
    assert again.count == 1 and all(again.score(u) == stats.score(u) for u in stats.units)
    narrow = StructureStats(LeNet5(widths={"conv1": 5, "conv2": 16, "fc1": 120, "fc2": 84}), every=1)
    try:
        narrow.load_state_dict(stats.state_dict())
    except ValueError as exc:
        assert "another shape" in str(exc)
    else:
        raise AssertionError("statistics of another shape were loaded")


def test_gathering_statistics_changes_nothing_in_training(tmp_path: Path) -> None:
    results = {}
    for every in (0, 3):
        spec = tiny_spec(f"stats{every}", max_iters=12, structure_stats_every=every, ckpt_interval=6)
        run_dir = tmp_path / spec.name
        run_dir.mkdir()
        spec.write(run_dir / "spec.json")
        assert run_mod.run(run_dir) == 0
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[every] = ([{k: v for k, v in r.items() if k != "elapsed_s"} for r in lines], summary)
    assert results[0][0] == results[3][0]  # every evaluation, bit for bit
    assert results[3][1]["structure_stats"] == {"every": 3, "count": 4}
    assert "structure_stats" not in results[0][1]


def test_checkpoints_carry_the_statistics() -> None:
    model, stats = _recorded_lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = tiny_spec("c")

    class _Pruner:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    payload = ckpt_state.payload(ckpt_state.Progress(step=1), spec.to_dict(), model, opt, _Pruner(), scaler, stats)
    assert payload["architecture"] == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    restored = StructureStats(model, every=1)
    ckpt_state.restore(payload, Path("x"), spec.to_dict(), model, opt, _Pruner(), scaler, restored)
    assert restored.count == 1 and torch.equal(restored.update, stats.update)
