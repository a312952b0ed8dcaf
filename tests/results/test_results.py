"""lib/results/plots/ and lib/results/report.py on hand-written results folders (no training).

Covers an accuracy task and a perplexity task (2 seeds, dense + 2 sparsities), a
mixed folder, and bad input: no runs, interrupted runs (missing or truncated
JSON), and runs without memory figures. Nothing may raise; what is missing is said.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib import cli
from lib.results import load, metric_of, plots, read_jsonl
from lib.results.plots import Context, graph_functions, method_colors, write_graphs
from lib.results.plots.memory import pareto_front
from lib.results.report import write_report
from tests.results.synthetic_results import ACCURACY, PERPLEXITY, build, set_run

PNG = b"\x89PNG\r\n\x1a\n"
GRAPH_SLUGS = ("metric_vs_sparsity", "peak_memory", "memory_timeline", "memory_vs_metric", "training_curves")


def _rendered(tmp_path_factory, name: str, table: dict) -> Path:
    """A hand-written results folder with its graphs and report drawn."""
    folder = build(tmp_path_factory.mktemp(name) / name, table)
    write_graphs(folder)
    write_report(folder)
    return folder


@pytest.fixture(scope="module")
def acc(tmp_path_factory) -> Path:
    return _rendered(tmp_path_factory, "lenet5_20250101_000000", ACCURACY)


@pytest.fixture(scope="module")
def ppl(tmp_path_factory) -> Path:
    return _rendered(tmp_path_factory, "gpt2_20250101_000000", PERPLEXITY)


@pytest.fixture
def low_dpi(monkeypatch):
    """Graphs that are only checked for existence are drawn small, to keep the suite fast."""
    monkeypatch.setattr(plots, "DPI", 30)


def _has_data(fig) -> bool:
    return any(ax.lines or ax.patches or ax.collections for ax in fig.axes)


@pytest.mark.parametrize("which,model", [("acc", "lenet5"), ("ppl", "gpt2")])
def test_every_graph_renders_a_png_with_data(which, model, request):
    folder = request.getfixturevalue(which)
    manifest = json.loads((folder / "graphs" / "graphs.json").read_text())
    assert manifest["skipped"] == []
    for slug in GRAPH_SLUGS:
        png = folder / "graphs" / f"{slug}_{model}.png"
        assert png.read_bytes()[:8] == PNG, slug
        assert png.stat().st_size > 15_000, (slug, png.stat().st_size)
    data = load(folder)
    ctx = Context(model, data.runs, metric_of(data.runs), method_colors(data))
    for slug, _, fn in graph_functions():
        fig = fn(ctx)
        assert not isinstance(fig, str), (slug, fig)
        assert _has_data(fig), slug


def test_metric_graph_has_one_line_per_method_and_direction_in_labels(ppl):
    data = load(ppl)
    fig = plots.metric_vs_sparsity(Context("gpt2", data.runs, metric_of(data.runs), method_colors(data)))
    ax = fig.axes[0]
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert labels == {"adamw/none (dense)", "adamw/magnitude", "adamwprune/bitter7/state"}
    assert "perplexity" in ax.get_ylabel() and "lower is better" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0%", "50%", "70%"]


def test_report_tables_hold_the_runs_numbers(acc):
    report = (acc / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| lenet5_adamw_magnitude_50_s1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["ok", "adamw", "magnitude", "50%", "1"]  # no variant column: no run has one
    assert cells[6:9] == ["97.00 (20)", "97.50", "50.0% / 50%"]
    assert cells[9] == "401.0 MiB RSS (CPU)" and cells[10] == "4.2 MiB"
    assert cells[11:] == ["1,234 images/s", "12.5 s"]
    for text in ("| adamw | magnitude | 50% | 2 / 2 | 97.70 ± 0.28 |",
                 "| sgd | magnitude | 50% | 2 / 2 | 97.60 ± 0.28 |",
                 "| adamw | none | 0% | 2 / 2 | 98.20 ± 0.28 |",
                 "| sgd | magnitude | 90% | 2 / 2 | 90.50 ± 0.71 |"):
        assert text in report, text
    assert "## lenet5: accuracy (higher is better)" in report
    assert "- 50%: adamw/magnitude: val 97.20 ± 0.28, test 97.70 ± 0.28" in report  # picked by the highest val
    assert "Command: `make MAX_ITERS=30 SEEDS=2`" in report and "CONFIG_MAX_ITERS=30" in report
    for slug in GRAPH_SLUGS:
        assert f"(graphs/{slug}_lenet5.png)" in report
    assert "No run failed, diverged or missed its sparsity." in report


def test_perplexity_report_picks_the_lowest_as_best(ppl):
    report = (ppl / "report.md").read_text()
    assert "## gpt2: perplexity (lower is better)" in report
    assert "- 50%: adamwprune/bitter7/state: val 37.78 ± 0.40, test 37.28 ± 0.40" in report  # the lowest val
    assert "- 70%: adamwprune/bitter7/state: val 39.70 ± 0.28, test 39.20 ± 0.28" in report
    assert "| adamwprune | bitter7 | state | 50% | 2 / 2 | 37.28 ± 0.40 |" in report
    row = next(line for line in report.splitlines() if line.startswith("| gpt2_adamwprune_bitter7_state_50_s1 |"))
    assert "| 37.50 (20) | 37.00 |" in row  # best val is the lowest perplexity, at step 20
    assert "1000.0 MiB alloc / 1200.0 MiB reserved (GPU)" in row
    assert "| 1,234 tokens/s (MFU 41.2% of H100) |" in row


def test_mixed_models_get_a_section_and_graphs_each(tmp_path, low_dpi):
    folder = build(tmp_path / "mixed", ACCURACY, PERPLEXITY)
    manifest = write_graphs(folder)
    report = (write_report(folder)).read_text()
    assert "## lenet5: accuracy (higher is better)" in report and "## gpt2: perplexity (lower is better)" in report
    files = {g["file"] for g in manifest["graphs"]}
    assert {f"graphs/{s}_{m}.png" for s in GRAPH_SLUGS for m in ("lenet5", "gpt2")} == files


def test_empty_folder_renders_and_says_so(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"folder": "empty", "command": "make", "runs": []}))
    manifest = write_graphs(folder)
    report = write_report(folder).read_text()
    assert manifest["graphs"] == [] and manifest["skipped"][0]["reason"] == "no runs in this folder"
    assert "No runs in this folder" in report and "config.txt is missing" in report
    bare = tmp_path / "bare"
    bare.mkdir()
    write_graphs(bare)
    assert "summary.json is missing" in write_report(bare).read_text()


def test_interrupted_runs_render_what_is_there(tmp_path, low_dpi):
    folder = build(tmp_path / "cut", ACCURACY)
    (folder / "summary.json").unlink()  # the matrix never got to write it
    (folder / "lenet5_sgd_magnitude_90_s1" / "summary.json").unlink()
    (folder / "lenet5_sgd_magnitude_90_s2" / "summary.json").write_text('{"name": "lenet5_sgd_magn')
    metrics = folder / "lenet5_adamw_none_0_s1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 40, "val": {"lo')
    assert len(read_jsonl(metrics)) == 3
    manifest = write_graphs(folder)
    report = write_report(folder).read_text()
    assert "lenet5_sgd_magnitude_90_s1: summary.json missing (interrupted run?)" in report
    assert "metrics.jsonl has 3 evaluation(s), the last at step 30" in report
    assert "lenet5_sgd_magnitude_90_s2: summary.json truncated or not JSON" in report
    assert "lenet5_adamw_none_0_s1: metrics.jsonl has a truncated or corrupt line (skipped)" in report
    assert "| lenet5_sgd_magnitude_90_s1 | incomplete | sgd | magnitude | 90% | 1 | - | - |" in report
    assert "| sgd | magnitude | 90% | 0 / 2 | - |" in report
    assert "| adamw | none | 0% | 2 / 2 | 98.20 ± 0.28 |" in report
    assert len(manifest["graphs"]) == len(GRAPH_SLUGS)


def test_flags_list_failed_diverged_and_sparsity_missed_with_their_error(tmp_path):
    folder = build(tmp_path / "flags", ACCURACY)
    set_run(folder, "lenet5_adamw_magnitude_90_s1", status="failed", error="RuntimeError: CUDA out of memory",
            best=None, test_at_best=None)
    set_run(folder, "lenet5_sgd_magnitude_90_s1", status="diverged", error="training loss became nan at step 12",
            test_at_best=None)
    set_run(folder, "lenet5_sgd_magnitude_50_s2", flags=["sparsity_missed"],
            sparsity={"target": 0.5, "reached": 0.31})
    report = write_report(folder).read_text()
    assert "| lenet5_adamw_magnitude_90_s1 | failed | failed | RuntimeError: CUDA out of memory |" in report
    assert "| lenet5_sgd_magnitude_90_s1 | diverged | diverged | training loss became nan at step 12 |" in report
    assert "| lenet5_sgd_magnitude_50_s2 | ok | sparsity_missed | - |" in report
    assert "31.0% / 50%" in report
    assert "| adamw | magnitude | 90% | 1 / 2 | 96.00 |" in report  # one seed left: no ±


def test_missing_memory_figures(tmp_path, low_dpi):
    folder = build(tmp_path / "nomem", ACCURACY)
    set_run(folder, "lenet5_adamw_none_0_s1", memory={})
    manifest = write_graphs(folder)
    report = write_report(folder).read_text()
    assert "lenet5_adamw_none_0_s1: no memory figures recorded" in report
    assert len(manifest["graphs"]) == len(GRAPH_SLUGS)
    for run in load(folder).runs:
        set_run(folder, run.name, memory=None)
        (folder / run.name / "train.jsonl").unlink()
    manifest = write_graphs(folder)
    report = write_report(folder).read_text()
    skipped = {g["graph"]: g["reason"] for g in manifest["skipped"]}
    assert set(skipped) == {"Peak memory and state bytes per run", "Memory during training",
                            "Memory vs metric (Pareto front)"}
    assert "Peak memory and state bytes per run: not drawn, no run recorded memory figures" in report
    assert not (folder / "graphs" / "peak_memory_lenet5.png").exists()  # the stale graph is gone
    assert (folder / "graphs" / "training_curves_lenet5.png").exists()  # still drawn from metrics.jsonl


def test_pareto_front_follows_the_metric_direction():
    points = [(1.0, 90.0), (2.0, 95.0), (2.0, 94.0), (3.0, 93.0)]
    assert pareto_front(points, higher_is_better=True) == [True, True, False, False]
    assert pareto_front(points, higher_is_better=False) == [True, False, False, False]


def test_cli_graphs_on_a_folder(tmp_path, capsys, low_dpi):
    folder = build(tmp_path / "cli", ACCURACY)
    assert cli.main(["graphs", "--results", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / 'graphs' / 'metric_vs_sparsity_lenet5.png'}" in out
    assert cli.main(["graphs", "--results", str(tmp_path / "nope")]) == 2
    assert "not a results folder" in capsys.readouterr().err


def test_the_units_table_adds_what_surgery_cut_to_what_was_masked(tmp_path) -> None:
    from lib.results.report import render

    folder = build(tmp_path / "cut", ACCURACY)
    name = "lenet5_adamw_magnitude_50_s1"
    sparsity = {"target": 0.5, "reached": 0.5, "structures": {"channel": {"removed": 0, "total": 19}}}
    set_run(folder, name, sparsity=sparsity, surgery=[{"step": 10, "removed": {"channel": 3}}])
    row = next(line for line in render(folder).splitlines() if line.startswith(f"| {name} | channel"))
    assert row == f"| {name} | channel: 0 of 19 masked, 3 cut by surgery |"
