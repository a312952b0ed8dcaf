"""What the graphs and the report must not hide: coincident series, ties, one seed, the test set's
resolution, log perplexity, memory above the process baseline and why the peak stands above the timeline,
every run in its own colour, shade and line style (or panel), and legends that look like the lines they name.

Hand-written results folders (tests/results/synthetic_results.py); nothing is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.colors import same_color
from matplotlib.lines import Line2D
from matplotlib.offsetbox import DrawingArea, HPacker, TextArea

from lib.hardware import memory
from lib.results import load, metric_of, plots
from lib.results.compare import compare, ranks
from lib.results.plots import Context, method_colors, method_markers
from lib.results.plots.curves import training_curves
from lib.results.plots.marks import dodges, infer_count, resolution_of, runs_text
from lib.results.plots.memory import cell_rows, memory_timeline, memory_vs_metric, pareto_front
from lib.results.report import render
from tests.results.synthetic_results import ACCURACY, PERPLEXITY, build, set_run

MiB = 2**20

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
    val = [ax for ax in training_curves(ctx).axes if ax.get_title().startswith("val")][0]
    assert val.get_yscale() == "log"


def test_x_label_mentions_dense_runs_only_when_there_are_some(tmp_path):
    pruned = {k: v for k, v in ACCURACY.items() if k[3] != "none"}
    assert "dense" not in plots.metric_vs_sparsity(_ctx(build(tmp_path / "p", pruned))).axes[0].get_xlabel()
    assert "dense runs at 0%" in plots.metric_vs_sparsity(_ctx(build(tmp_path / "d", ACCURACY))).axes[0].get_xlabel()


def _with_running_peak(folder: Path, name: str, peak: int | None = None) -> None:
    """Give one run's train.jsonl the high-water mark so far (``peak``, else its in-use samples)."""
    curve = [json.loads(line) for line in (folder / name / "train.jsonl").read_text().splitlines()]
    (folder / name / "train.jsonl").write_text("".join(json.dumps({**c, "peak_rss_bytes": peak or c["rss_bytes"]})
                                                       + "\n" for c in curve))


def _baseline(runs) -> float:
    """The smallest RSS sample of any run, in MiB: what the timeline is drawn above."""
    return min(rec["rss_bytes"] for r in runs for rec in r.curve()) / MiB


def test_timeline_explains_the_peak_above_the_baseline(tmp_path):
    folder = build(tmp_path / "mem", ACCURACY)
    name = "lenet5_sgd_none_0_s1"
    _with_running_peak(folder, name, 900 * MiB)
    set_run(folder, name, memory={"peak_rss_bytes": 900 * MiB})  # far above its in-use samples (~380 MiB)
    ctx = _ctx(folder)
    fig = memory_timeline(ctx)
    base = _baseline(ctx.runs)
    ax = next(ax for ax in fig.axes if any(line.get_gid() == name for line in ax.lines))
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 900 - base
    assert any(max(line.get_ydata()) == 900 - base for line in ax.lines)  # the high-water mark so far, the peak
    assert any("peak in summary.json (900 MiB" in n for n in ctx.notes)


def test_timeline_is_drawn_above_the_process_baseline(tmp_path):
    ctx = _ctx(build(tmp_path / "mem", ACCURACY))
    fig = memory_timeline(ctx)
    base = _baseline(ctx.runs)
    lines = [line for ax in fig.axes for line in ax.lines if line.get_label().startswith("in use")]
    for run in ctx.runs:
        (line,) = [line for line in lines if line.get_gid() == run.name]
        assert list(line.get_ydata()) == [rec["rss_bytes"] / MiB - base for rec in run.curve()]
    assert min(y for line in lines for y in line.get_ydata()) == 0
    labelled = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labelled and all(f"MiB above {base:.1f}" in label for label in labelled)
    assert f"above the process baseline, the smallest sample of any run: process RSS (CPU) {base:.1f} MiB" in \
        fig.get_suptitle()


def test_timeline_gives_each_method_and_sparsity_its_own_panel(tmp_path):
    ctx = _ctx(build(tmp_path / "mem", ACCURACY))
    fig = memory_timeline(ctx)
    by_name = {r.name: r for r in ctx.runs}
    drawn = set()
    for ax in fig.axes:
        names = {line.get_gid() for line in ax.lines}
        assert ax.get_visible() == bool(names)
        if names:
            (method, target), = {by_name[n].group[1:] for n in names}  # one method and sparsity per panel
            assert ax.get_title() == f"{method} {target * 100:g} %"
            drawn |= names
    assert drawn == set(by_name)
    assert cell_rows([("b", 0.5), ("a", 0.0), ("b", 0.9), ("c", 0.0), ("b", 0.7), ("d", 0.5)]) == \
        [[("b", 0.5), ("b", 0.7), ("b", 0.9)], [("a", 0.0), ("c", 0.0), ("d", 0.5)]]


def test_timeline_legend_looks_like_the_lines_it_names(tmp_path):
    folder = build(tmp_path / "mem", ACCURACY)
    for name in ("lenet5_sgd_none_0_s1", "lenet5_sgd_none_0_s2"):
        _with_running_peak(folder, name)
    fig = memory_timeline(_ctx(folder))
    lines = [line for ax in fig.axes for line in ax.lines]
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.texts]
    assert {line.get_label() for line in lines} == set(labels)  # every kind of line drawn is in the legend
    assert len(labels) == 5  # in use and peak so far for each of the 2 seeds, and the summary's peak
    for handle, label in zip(legend.legend_handles, labels, strict=True):
        for line in [line for line in lines if line.get_label() == label]:
            assert same_color(line.get_color(), handle.get_color()), label
            assert (line.get_linestyle(), line.get_linewidth(), line.get_marker()) == \
                (handle.get_linestyle(), handle.get_linewidth(), handle.get_marker()), label


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
    training_curves(ctx)
    assert ("identical training curves (drawn on top of each other): lenet5_adamw_none_0_s1 = "
            "lenet5_adamwprune_none_0_s1") in ctx.notes
    assert not any("sgd" in n for n in ctx.notes if n.startswith("identical training curves"))


def _lines(fig, panel: str) -> dict[str, Line2D]:
    """The lines of the training-curves panel titled ``panel``, by run name."""
    ax = next(ax for ax in fig.axes if ax.get_title() == panel)
    return {line.get_label(): line for line in ax.lines}


def _legend_entries(fig) -> dict[str, list[Line2D]]:
    """label -> the lines drawn in its legend key (several, side by side, for a tuple of handles)."""
    entries = {}
    for box in fig.legends[0].findobj(HPacker):
        key, *text = box.get_children()
        if isinstance(key, DrawingArea) and len(text) == 1 and isinstance(text[0], TextArea):
            entries[text[0].get_text()] = [a for a in key.get_children() if isinstance(a, Line2D)]
    return entries


def test_runs_differing_only_in_sparsity_get_their_own_shade(tmp_path):
    ctx = _ctx(build(tmp_path / "acc", ACCURACY))
    fig = training_curves(ctx)
    for panel in ("train loss", "val accuracy (%)", "sparsity (%)", "learning rate"):
        lines = _lines(fig, panel)
        for method in ("adamw", "sgd"):
            dense, half, most = (lines[f"lenet5_{method}_{p}_s1"] for p in ("none_0", "magnitude_50", "magnitude_90"))
            assert not same_color(half.get_color(), most.get_color())  # one method, two sparsities: two shades
            assert half.get_linestyle() == most.get_linestyle()  # the line style stays the seed's
            seed2 = lines[f"lenet5_{method}_magnitude_50_s2"]
            assert same_color(seed2.get_color(), half.get_color()) and seed2.get_linestyle() != half.get_linestyle()
            assert not same_color(dense.get_color(), half.get_color())
    assert {"sparsity 50 %", "sparsity 90 %"} <= set(_legend_entries(fig))
    assert "shade = target sparsity" in fig.get_suptitle()


def test_training_curves_legend_shows_exactly_the_colours_drawn(tmp_path):
    ctx = _ctx(build(tmp_path / "acc", ACCURACY))
    fig = training_curves(ctx)
    lines = _lines(fig, "train loss")
    runs = {r.name: r for r in ctx.runs}
    entries = _legend_entries(fig)
    named = {label: [n for n, r in runs.items() if label in (r.method, f"sparsity {r.target * 100:g} %")]
             for label in entries}
    assert set(named) == {"adamw/magnitude", "adamw/none", "sgd/magnitude", "sgd/none", "sparsity 50 %",
                          "sparsity 90 %", "seed 1 (line style, any colour)", "seed 2 (line style, any colour)"}
    for label, key in entries.items():
        if label.startswith("seed"):  # a style key: the seed's line style, in black
            style = {lines[n].get_linestyle() for n, r in runs.items() if f"seed {r.seed} " in label + " "}
            assert {k.get_linestyle() for k in key} == style, label
            continue
        shown = [k.get_color() for k in key]
        drawn = [lines[n].get_color() for n in named[label]]
        assert all(any(same_color(s, d) for d in drawn) for s in shown), label  # no colour that is not drawn
        assert all(any(same_color(d, s) for s in shown) for d in drawn), label  # and every one that is


def test_coincident_sparsity_and_learning_rate_schedules_are_named(tmp_path):
    folder = build(tmp_path / "acc", ACCURACY)
    for run in load(folder).runs:  # sgd gets its own learning rate; the adamw runs keep sharing theirs
        if run.optimizer == "sgd":
            path = folder / run.name / "train.jsonl"
            curve = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({**c, "lr": c["lr"] * 10}) + "\n" for c in curve))
    ctx = _ctx(folder)
    fig = training_curves(ctx)
    same = "(drawn on top of each other): "
    expected = [f"identical sparsity schedules {same}adamw/none at 0 %; sgd/none at 0 % (seeds 1, 2 each)",
                f"identical sparsity schedules {same}adamw/magnitude at 50 %; sgd/magnitude at 50 % (seeds 1, 2 each)",
                f"identical sparsity schedules {same}adamw/magnitude at 90 %; sgd/magnitude at 90 % (seeds 1, 2 each)",
                f"identical learning-rate schedules {same}adamw/magnitude at 50, 90 %; adamw/none at 0 % "
                "(seeds 1, 2 each)",
                f"identical learning-rate schedules {same}sgd/magnitude at 50, 90 %; sgd/none at 0 % (seeds 1, 2 each)"]
    assert sorted(n for n in ctx.notes if "schedules" in n) == sorted(expected)
    drawn = " ".join(" ".join(t.get_text().split()) for t in fig.texts)  # the notes under the figure, unwrapped
    assert all(note in drawn for note in expected)


def test_runs_text_names_seeds_only_where_they_differ(tmp_path):
    table = {("lenet5", "adamw", "", "magnitude", 0.5): (97.0, 98.0), ("lenet5", "sgd", "", "magnitude", 0.5): (97.0,),
             ("lenet5", "sgd", "", "magnitude", 0.9): (96.0,)}
    runs = load(build(tmp_path / "uneven", table)).runs  # adamw has seeds 1 and 2, sgd seed 1 only
    assert runs_text(runs, ["1", "2"]) == "adamw/magnitude at 50 % (seeds 1, 2); sgd/magnitude at 50 % (seed 1), " \
        "90 % (seed 1)"
    sgd = [r for r in runs if r.optimizer == "sgd"]
    assert runs_text(sgd, ["1", "2"]) == "sgd/magnitude at 50, 90 % (seed 1 each)"
    assert runs_text(sgd, ["1"]) == "sgd/magnitude at 50, 90 %"  # one seed in the model: nothing to tell apart
