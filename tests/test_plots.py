"""What the graphs and the report must not hide: coincident series, ties, one seed, the test set's
resolution, log perplexity, memory axes from zero and why the peak stands above the timeline.

Hand-written results folders (tests/synthetic_results.py); nothing is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib import memory, plots
from lib.compare import compare, ranks
from lib.plots import Context, method_colors, method_markers
from lib.plots_marks import dodges, infer_count, resolution_of
from lib.plots_memory import memory_timeline, memory_vs_metric, pareto_front
from lib.report import render
from lib.results import load, metric_of
from tests.synthetic_results import ACCURACY, PERPLEXITY, build, set_run

# adamwprune with pruning off is adamw: the same numbers, so its series lies on top of adamw's
TWINS = {**ACCURACY, ("lenet5", "adamwprune", "", "none", 0.0): ACCURACY[("lenet5", "adamw", "", "none", 0.0)]}
# 500 test images: every accuracy is a whole number of them (0.2 points each)
ONE_SEED = {("lenet5", "sgd", "", "none", 0.0): (98.2,), ("lenet5", "adamw", "", "magnitude", 0.5): (97.4,),
            ("lenet5", "sgd", "", "magnitude", 0.5): (97.8,), ("lenet5", "adamw", "", "magnitude", 0.9): (98.4,)}


def _ctx(folder: Path, model: str = "lenet5") -> Context:
    data = load(folder)
    runs = data.models()[model]
    return Context(model, runs, metric_of(runs), method_colors(data), method_markers([r.method for r in data.runs]))


def _xs(fig, label: str) -> list[float]:
    """x positions of the error-bar series labelled ``label``."""
    for container in fig.axes[0].containers:
        if container.get_label() == label:
            return list(container.lines[0].get_xdata())
    raise AssertionError(f"no series {label!r}")


@pytest.fixture
def twins(tmp_path) -> Path:
    return build(tmp_path / "twins", TWINS)


@pytest.fixture
def one_seed(tmp_path) -> Path:
    return build(tmp_path / "one_seed", ONE_SEED, seeds=(1,))


def test_coincident_series_are_dodged_marked_and_listed(twins):
    ctx = _ctx(twins)
    fig = plots.metric_vs_sparsity(ctx)
    a, b = _xs(fig, "adamw/none (dense)"), _xs(fig, "adamwprune/none (dense)")
    assert a != b and abs(a[0]) < 5 and abs(b[0]) < 5  # side by side, both near 0 %
    markers = {c.get_label(): c.lines[0].get_marker() for c in fig.axes[0].containers}
    assert markers["adamw/none (dense)"] != markers["adamwprune/none (dense)"]
    assert "same value at 0%: adamw/none = adamwprune/none (98.20 ± 0.28)" in ctx.notes


def test_the_manifest_and_the_report_carry_the_notes(twins, monkeypatch):
    monkeypatch.setattr(plots, "DPI", 30)
    manifest = plots.write_graphs(twins)
    notes = {g["graph"]: g.get("notes", []) for g in manifest["graphs"]}
    assert any("adamw/none = adamwprune/none" in n for n in notes["Test metric vs sparsity"])
    assert any("adamw/none 0% = adamwprune/none 0%" in n for n in notes["Memory vs metric (Pareto front)"])
    assert json.loads((twins / "graphs" / "graphs.json").read_text()) == manifest
    assert "- same value at 0%: adamw/none = adamwprune/none" in render(twins)


def test_dodges_are_centred_and_stay_between_ticks():
    offsets = dodges(["a", "b", "c"], [0, 50, 70, 90])
    assert offsets["b"] == 0 and offsets["a"] == -offsets["c"] and offsets["c"] - offsets["a"] < 20 * 0.5


def test_one_seed_says_no_spread_and_shows_the_test_set_resolution(one_seed):
    ctx = _ctx(one_seed)
    fig = plots.metric_vs_sparsity(ctx)
    ax = fig.axes[0]
    assert "no spread available" in ax.get_title()
    assert any("no spread available" in n for n in ctx.notes)
    assert any("0.2 points" in n and "500" in n for n in ctx.notes)
    low, high = ax.get_ylim()
    assert high - low >= 10 * 0.2 - 1e-9  # a 1-point range of values is drawn over at least 10 test images


def test_test_set_size_is_inferred_or_read_from_the_record(one_seed):
    assert infer_count([98.2, 97.4, 97.8, 98.4]) == 500
    assert infer_count([98.0, 98.0]) is None and infer_count([33.3333, 50.0]) is None
    runs = load(one_seed).runs
    assert resolution_of(runs, metric_of(runs)).inferred
    for r in runs:
        set_run(one_seed, r.name, test_at_best={**r.summary["test_at_best"], "samples": 1000})
    runs = load(one_seed).runs
    recorded = resolution_of(runs, metric_of(runs))
    assert (recorded.count, recorded.inferred, recorded.step) == (1000, False, 0.1)


def test_perplexity_axes_are_logarithmic(tmp_path):
    ctx = _ctx(build(tmp_path / "ppl", PERPLEXITY), "gpt2")
    assert plots.metric_vs_sparsity(ctx).axes[0].get_yscale() == "log"
    val = [ax for ax in plots.training_curves(ctx).axes if ax.get_title().startswith("val")][0]
    assert val.get_yscale() == "log"


def test_x_label_mentions_dense_runs_only_when_there_are_some(tmp_path):
    pruned = {k: v for k, v in ACCURACY.items() if k[3] != "none"}
    assert "dense" not in plots.metric_vs_sparsity(_ctx(build(tmp_path / "p", pruned))).axes[0].get_xlabel()
    assert "dense runs at 0%" in plots.metric_vs_sparsity(_ctx(build(tmp_path / "d", ACCURACY))).axes[0].get_xlabel()


def test_timeline_starts_at_zero_and_explains_the_peak(tmp_path):
    folder = build(tmp_path / "mem", ACCURACY)
    name = "lenet5_sgd_none_0_s1"
    curve = [json.loads(line) for line in (folder / name / "train.jsonl").read_text().splitlines()]
    (folder / name / "train.jsonl").write_text("".join(json.dumps({**c, "peak_rss_bytes": 900 * 2**20}) + "\n"
                                                       for c in curve))
    set_run(folder, name, memory={"peak_rss_bytes": 900 * 2**20})  # far above its in-use samples (~380 MiB)
    ctx = _ctx(folder)
    fig = memory_timeline(ctx)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 900
    assert any(max(line.get_ydata()) == 900 for line in ax.lines)  # the high-water mark so far, and the peak
    assert any("peak in summary.json (900 MiB" in n for n in ctx.notes)


def test_memory_current_logs_the_same_peak_counter_as_the_summary():
    now, peak = memory.current(torch.device("cpu")), memory.peak(torch.device("cpu"))
    assert now["peak_rss_bytes"] is not None and now["peak_rss_bytes"] >= now["rss_bytes"] > 0
    assert set(peak) <= set(now) | {"cuda_max_reserved_bytes"}


def test_pareto_ties_are_kept_and_listed(twins):
    assert pareto_front([(1.0, 98.0), (1.0, 98.0), (2.0, 97.0)], higher_is_better=True) == [True, True, False]
    ctx = _ctx(twins)
    memory_vs_metric(ctx)
    assert any(n.startswith("tie on the Pareto front: adamw/none 0% = adamwprune/none 0%") for n in ctx.notes)
    assert any("tied in both memory and metric are all kept" in n for n in ctx.notes)


def test_a_single_run_says_so(tmp_path):
    ctx = _ctx(build(tmp_path / "single", {("lenet5", "adamw", "", "magnitude", 0.5): (97.4,)}, seeds=(1,)))
    reason = memory_vs_metric(ctx)
    assert isinstance(reason, str) and reason.startswith("one point only")
    plots.metric_vs_sparsity(ctx)
    assert any(n.startswith("one run (adamw/magnitude)") for n in ctx.notes)


def test_report_marks_ties_and_says_what_wall_time_measures(twins):
    report = render(twins)
    assert ("- 0%: tie between 2 methods, adamw/none: val 97.70 ± 0.28, test 98.20 ± 0.28; adamwprune/none: "
            "val 97.70 ± 0.28, test 98.20 ± 0.28") in report
    assert "- 50%: adamw/magnitude: val 97.20 ± 0.28, test 97.70 ± 0.28" in report  # no tie: one name
    assert "wall time (training loop) |" in report and "the test evaluation are not in it" in report


def test_compare_ranks_ties_as_ties(twins):
    assert ranks([98.0, 98.0, 97.0, 96.0, 96.0]) == ["1=", "1=", "3", "4=", "4="]
    out = compare(twins)
    assert "| 0% | 1= | adamw/none | 97.70 ± 0.28 (n=2/2) | 98.20 ± 0.28 (n=2/2) | - | - |" in out
    assert ("| 0% | 1= | adamwprune/none | 97.70 ± 0.28 (n=2/2) | 98.20 ± 0.28 (n=2/2) | +0.00 [+0.00, +0.00] "
            "(paired t, n=2): not significant | - |") in out


def test_unreadable_runs_are_flagged(tmp_path):
    folder = build(tmp_path / "bad", ACCURACY)
    set_run(folder, "lenet5_sgd_none_0_s1", status="unreadable", error="summary.json is damaged")
    assert "| lenet5_sgd_none_0_s1 | unreadable | unreadable | summary.json is damaged |" in render(folder)


def test_identical_training_curves_are_listed(twins):
    ctx = _ctx(twins)
    plots.training_curves(ctx)
    assert ("identical training curves (drawn on top of each other): lenet5_adamw_none_0_s1 = "
            "lenet5_adamwprune_none_0_s1") in ctx.notes
    assert not any("sgd" in n for n in ctx.notes)
