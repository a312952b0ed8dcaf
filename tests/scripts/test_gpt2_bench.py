"""scripts/bench_trainer.py at a tiny size: the table and JSON structure (never the timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_tiny_bench_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_trainer", ROOT / "scripts" / "bench_trainer.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sub" / "bench_trainer.json"
    argv = ["--steps", "3", "--repeats", "1", "--batch", "2", "--block", "8", "--vocab", "64",
            "--train-tokens", "2000", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert (data["steps"], data["repeats"], data["vocab"], data["threads"]) == (3, 1, 64, 1)
    assert len(data["rounds"]["trainer"]) == len(data["rounds"]["bare"]) == 1
    names = [r["name"] for r in data["rows"]]
    assert names == ["trainer tokens/s (median)", "bare loop tokens/s (median)", "P5 trainer / bare"]
    p5 = data["rows"][2]
    assert p5["target"] == ">= 0.97" and p5["met"] in ("yes", "no") and p5["value"] > 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in names) and "round 0 (warm-up)" in printed
