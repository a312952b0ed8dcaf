"""lib/train/tracking.py: a tracker failure never stops a run; wandb offline stays local; trackio is optional."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from lib.core.errors import ConfigError, HarnessError
from lib.train import run as run_mod
from lib.train import tracking
from lib.train.tracking import NullTracker, open_tracker
from tests.conftest import tiny_spec


class Boom:
    """A tracker that starts but raises on every log and on finish."""

    calls: list[str] = []

    def __init__(self, spec, run_dir) -> None:
        Boom.calls.append("init")

    def log(self, record) -> None:
        Boom.calls.append("log")
        raise RuntimeError("tracker server went away")

    def finish(self) -> None:
        Boom.calls.append("finish")
        raise RuntimeError("cannot finish")


class BadStart:
    def __init__(self, spec, run_dir) -> None:
        raise ConnectionError("no route to host")


def test_a_failing_tracker_does_not_stop_a_real_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(tracking.TRACKERS, "boom", Boom)
    Boom.calls = []
    spec = dataclasses.replace(tiny_spec("tracked", max_iters=10), tracker="boom")
    run_dir = tmp_path / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert run_mod.run(run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test_at_best"], summary
    assert Boom.calls == ["init", "log"]  # disabled after its first failure: no more calls
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: tracker")]
    assert len(warnings) == 1 and "tracker server went away" in warnings[0]


def test_a_tracker_that_cannot_start_is_dropped_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tracking.TRACKERS, "badstart", BadStart)
    tracker = open_tracker(dataclasses.replace(tiny_spec(), tracker="badstart"), tmp_path)
    assert not tracker.active
    tracker.log({"step": 1})
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning: tracker badstart failed to start") == 1 and "no route to host" in err


def test_finish_failure_is_caught(tmp_path, monkeypatch, capsys):
    class FinishBoom(NullTracker):
        def finish(self) -> None:
            raise TimeoutError("upload took too long")

    monkeypatch.setitem(tracking.TRACKERS, "fb", FinishBoom)
    tracker = open_tracker(dataclasses.replace(tiny_spec(), tracker="fb"), tmp_path)
    tracker.log({"step": 1})
    tracker.finish()
    assert "failed to finish (TimeoutError: upload took too long)" in capsys.readouterr().err


def test_only_rank_zero_tracks(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "boom", Boom)
    Boom.calls = []
    tracker = open_tracker(dataclasses.replace(tiny_spec(), tracker="boom"), tmp_path, rank=1)
    tracker.log({"step": 1})
    tracker.finish()
    assert Boom.calls == []


def test_unknown_tracker_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="valid: none, trackio, wandb"):
        open_tracker(dataclasses.replace(tiny_spec(), tracker="tensorboard"), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("trackio") is not None, reason="trackio is installed here")
def test_trackio_without_the_package_names_the_pip_command(tmp_path):
    with pytest.raises(HarnessError) as info:
        open_tracker(dataclasses.replace(tiny_spec(), tracker="trackio"), tmp_path)
    message = str(info.value)
    assert "\n" not in message and "`.venv/bin/pip install trackio`" in message


def test_flatten_nests_keys_with_slashes():
    assert tracking.flatten({"step": 3, "val": {"loss": 1.0, "accuracy": 2.0}}) == \
        {"step": 3, "val/loss": 1.0, "val/accuracy": 2.0}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_writes_under_the_run_dir(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: never sync
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = dataclasses.replace(tiny_spec("wb"), tracker="wandb", wandb_mode="offline", tracker_project="test")
    tracker = open_tracker(spec, run_dir)
    assert tracker.active
    tracker.log({"step": 5, "lr": 0.1, "val": {"loss": 1.0, "accuracy": 50.0}})
    tracker.finish()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((run_dir / "wandb").iterdir())
