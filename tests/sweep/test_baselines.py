"""Wanda and SparseGPT as `make sweep` metrics on the tiny GPT (issue 32): rows with measured perplexity at exact
sparsities, SparseGPT's with rewritten weights and no structured row; tests/gpt2/test_hf.py sweeps them on a model
started from an imported transformers GPT-2 too."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib.core.errors import ConfigError
from lib.core.spec import RunSpec
from lib.core.task import get_task
from lib.pruning import prunable_parameters
from lib.pruning.threshold import prune_count
from lib.sweep.oneshot import sweep_run
from tests.conftest import synthetic_spec, trained_run

ASKED = {"SPARSITIES": "50", "METRICS": "magnitude,wanda,sparsegpt", "PATTERNS": "unstructured,2:4",
         "CALIBRATION": "2", "TOLERANCE": "50"}


def sweep_baselines(run_dir: Path, asked: dict[str, str] = ASKED) -> dict[tuple[str, str], dict]:
    """The rows of magnitude, Wanda and SparseGPT of ``run_dir``'s checkpoint, checked for what each must hold:
    a measured perplexity, 50 % exactly over the prunable weights (2:4: over the layers 4 divides)."""
    record = sweep_run(run_dir, asked, say=lambda _: None)
    spec = RunSpec.read(run_dir / "spec.json")
    total = sum(p.numel() for _, p in prunable_parameters(get_task("gpt2").build_model(spec)))
    rows = {(r["pattern"], r["metric"]): r for r in record["rows"]}
    for metric in ("magnitude", "wanda", "sparsegpt"):
        unstructured, nm = rows[("unstructured", metric)], rows[("2:4", metric)]
        assert unstructured["val"]["perplexity"] > 1 and nm["val"]["perplexity"] > 1
        assert unstructured["reached"] == prune_count(total, 0.5) / total and nm["reached"] == 0.5
    text = (run_dir / "sweep" / "sweep.md").read_text()
    assert "| unstructured | sparsegpt | 50 % |" in text and "| 2:4 | wanda | 50 % |" in text
    return rows


def test_wanda_and_sparsegpt_are_sweep_rows_on_the_tiny_gpt(tmp_path: Path) -> None:
    run_dir = trained_run(tmp_path, synthetic_spec(tmp_path, max_iters=20))
    rows = sweep_baselines(run_dir)
    # the three rank differently, so the same count of zeros gives three different models
    values = {m: rows[("unstructured", m)]["val"]["perplexity"] for m in ("magnitude", "wanda", "sparsegpt")}
    assert len(set(values.values())) == 3, values
    structured = sweep_run(run_dir, {**ASKED, "METRICS": "sparsegpt", "PATTERNS": "structured"}, say=lambda _: None)
    assert structured["rows"][0]["skipped"].startswith("SparseGPT removes single weights or N:M groups")
    with pytest.raises(ConfigError, match="need calibration batches, and CALIBRATION is 0"):
        sweep_run(run_dir, {**ASKED, "METRICS": "sparsegpt", "CALIBRATION": "0"}, say=lambda _: None)
