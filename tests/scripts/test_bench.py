"""scripts/bench_pruning.py at a tiny scale: the table and JSON structure (never the timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_timing(check: dict, sides: int) -> None:
    """A benchmark's timing record (lib/timing.summary): each side's median and IQR, the load, the verdict."""
    assert len(check["sides"]) == sides and all(s["median"] > 0 and s["iqr"] >= 0 for s in check["sides"].values())
    assert check["load_avg_1min"] >= 0 and check["cores"] >= 1 and isinstance(check["reliable"], bool)


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_pruning")


def test_tiny_run_writes_table_and_json(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "bench.json"
    argv = ["--scale", "0.0003", "--repeats", "1", "--draws", "3", "--no-parts", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["scale"] == 0.0003 and 0 < data["weights"] < 100_000
    names = [r["name"] for r in data["rows"]]
    for prefix in ("P3 exact / sampled", "P3 cat+kthvalue / sampled", "P3 sampled mean", "P3 sampled worst", "P3b",
                   "P4 movement", "P4 magnitude", "p1", "p2", "p2_spam", "p4_adamwprune"):
        assert any(n.startswith(prefix) for n in names), prefix
    for r in data["rows"]:
        assert set(r) >= {"name", "value", "target", "met", "detail"}
        assert r["met"] in ("yes", "no", "?")
        assert isinstance(r["detail"], str)
    for r in data["rows"]:  # every timed row keeps its spread and the load it was measured under
        if r["name"].startswith(("P3 exact", "P3 cat", "P3b")):
            assert_timing(r["timing"], 2)
    printed = capsys.readouterr().out
    assert "name" in printed and "target" in printed and "met" in printed
    assert all(r["name"][:52] in printed for r in data["rows"])


def test_memory_ratios_are_exact_byte_counts(bench) -> None:
    model = bench.gpt2_like(0.0003)
    opt = bench.adamw_with_grads(model)
    # AdamW keeps two float32 moments per weight; movement adds a float32 score, both a 1-bit mask.
    assert bench.p4(model, opt, "movement", "<= 4.04")["value"] == pytest.approx(4 + 1 / 32, abs=0.002)
    assert bench.p4(model, opt, "magnitude", "<= 3.04")["value"] == pytest.approx(3 + 1 / 32, abs=0.002)


def test_adamwprune_parts_are_included_or_reported_missing(bench, tmp_path: Path) -> None:
    parts = tmp_path / "parts.py"
    parts.write_text(
        "def p1(n):\n    return {'name': 'P1 x', 'value': 1.0, 'target': 1.05, 'detail': {'ms': 3}}\n"
        "def p2(n):\n    return {'name': 'P2 x', 'value': 2.0, 'target': 1.3, 'detail': 'slow'}\n"
        "def p2_spam(n):\n    return {'name': 'P2s x', 'value': 1.2, 'target': 1.5, 'detail': 'ok'}\n"
        "def p4_adamwprune(n):\n    raise RuntimeError('boom')\n"
        "def p4s_memory(n):\n    return {'name': 'P4s x', 'value': 1.23, 'target': 1.3, 'detail': ''}\n"
    )  # p4s_step is absent: a part the file lacks is one failed row, the others still count
    rows = bench.adamwprune_rows(1000, parts)
    assert [(r["name"], r["met"]) for r in rows] == [("P1 x", "yes"), ("P2 x", "no"), ("P2s x", "yes"),
                                                     ("p4_adamwprune (failed)", "?"), ("P4s x", "yes"),
                                                     ("p4s_step (failed)", "?")]
    assert json.loads(rows[0]["detail"]) == {"ms": 3} and "boom" in rows[3]["detail"]
    missing = bench.adamwprune_rows(1000, tmp_path / "absent.py")
    assert [r["name"] for r in missing] == ["p1 (missing)", "p2 (missing)", "p2_spam (missing)",
                                            "p4_adamwprune (missing)", "p4s_memory (missing)", "p4s_step (missing)"]


@pytest.mark.parametrize(
    "value, target, expected",
    [(41, ">= 40", "yes"), (3.5, "<= 3", "no"), (0.01, "≤ 0.02", "yes"), (1.0, 1.05, "yes"), (None, "<= 1", "?")],
)
def test_met(bench, value, target, expected: str) -> None:
    assert bench.met(value, target) == expected


def test_checkpoint_bench_structure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/bench_checkpoint.py on the tiny GPT-2: the fields and the printout (never the timings)."""
    module = load_script("bench_checkpoint")
    out = tmp_path / "bench_checkpoint.json"
    assert module.main(["--size", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert 2.9 < data["size_over_weights"] < 3.1  # weights + two AdamW moments + 1-bit masks
    assert data["write_s"] > 0 and data["load_verify_s"] > 0 and data["write_over_train_step"] > 0
    assert data["write_over_bare"] > 0 and data["load_over_bare"] > 0 and data["bare_load_s"] > 0
    assert 0.5 < data["peak_rss_over_file"] < 3 and data["peak_load_bytes"]["bare"] > 0  # measured, in processes
    assert not list(tmp_path.glob("bench_checkpoint_*"))  # the checkpoints it wrote are gone
    assert_timing(data["timing"], 5)
    printed = capsys.readouterr().out
    assert "x the weights" in printed and "beside bare torch.save + fsync" in printed


def test_the_activation_checkpointing_bench_writes_its_table(tmp_path: Path, capsys) -> None:
    """scripts/bench_activation_ckpt.py on the tiny GPT only, one round: every policy's row and the verdict."""
    module = load_script("bench_activation_ckpt")
    out = tmp_path / "ac.json"
    assert module.main(["--only", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["results"]["tiny GPT (8x64 tokens)"]
    assert [r["policy"] for r in rows] == ["none", "uniform", "sqrt", "selective", "budget"]
    assert rows[0]["time_ratio"] == 1.0 and all(r["estimated_bytes"] > 0 for r in rows)
    assert rows[2]["estimated_bytes"] < 0.5 * rows[0]["estimated_bytes"]  # sqrt keeps segment inputs only
    assert_timing(rows[2]["timing"], 5)
    printed = capsys.readouterr().out
    assert "tiny GPT (8x64 tokens): sqrt memory" in printed and "met " in printed
    assert module.main(["--only", "nothing"]) == 2


def test_the_2_of_4_bench_writes_its_rows_and_says_what_it_could_not_measure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "nm.json"
    assert load_script("bench_nm").main(["--tokens", "8", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["layer"] for r in data["rows"]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert all(r["dense_ms"] > 0 and r["nm_ms"] > 0 for r in data["rows"])
    assert_timing(data["rows"][0]["timing"], 2)
    if not data["sparse_kernels"]:
        assert "GPU 2:4 kernels: unmeasured here" in capsys.readouterr().out
