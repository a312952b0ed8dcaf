"""Memory graphs of one model's runs: peak memory per run and the memory timeline; memory vs
metric (Pareto) is in lib/results/plots/pareto.py and re-exported here.

Used by lib/results/plots.write_graphs; each function returns a Figure or the reason it was skipped.
Measured peaks are GPU max allocated/reserved on a GPU run and peak RSS (whole process,
torch runtime included) on a CPU run: high-water marks from the start of training to the end
of the test evaluation, each step's activations included. The timeline draws the memory in
use when each log line was written (between optimizer steps) and, where train.jsonl records
it, the same high-water mark so far, ending at the summary's peak; one panel per
optimizer/method and sparsity, above the smallest sample of any run. State bytes are counted
exactly from the tensors.
"""

from __future__ import annotations

import statistics
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib.results.plots.marks import sparsity_text
from lib.results.plots.pareto import memory_vs_metric, pareto_front
from lib.results.plots.style import Context, draw_notes, legend_outside, seed_style
from lib.core.units import MIB
from lib.results import Run, groups

__all__ = ["cell_rows", "memory_timeline", "memory_vs_metric", "pareto_front", "peak_memory"]

MAX_BARS = 40  # more runs than this: one bar per group (mean over seeds) instead of per run
STATE_PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer_state", "optimizer state"),
               ("pruning_buffers", "pruning buffers"))
MEASURED = (("cuda_max_allocated_bytes", "GPU max allocated", "#1f77b4"),
            ("cuda_max_reserved_bytes", "GPU max reserved", "#aec7e8"),
            ("peak_rss_bytes", "CPU peak RSS (process high-water mark)", "#7f7f7f"))
PEAK_NOTE = ("measured peak = high-water mark from the start of training to the end of the test evaluation, "
             "each step's activations included (summary.json); the memory timeline's in-use samples are taken "
             "between optimizer steps, so they stay below it")
# (in-use key, high-water key, panel title) of train.jsonl; the high-water key is also summary.json's peak
TIMELINE = (("cuda_allocated_bytes", "cuda_max_allocated_bytes", "GPU allocated"),
            ("rss_bytes", "peak_rss_bytes", "process RSS (CPU)"))
GAP = 1.1  # a summary peak this many times the largest in-use sample gets a note
# (legend label, colour, line width) of the timeline's lines: the thin high-water mark is drawn over the wider
# in-use line, in another colour, so that both stay visible where they coincide (RSS rarely shrinks)
IN_USE = ("in use when logged (between steps)", "#4c72b0", 2.4)
SO_FAR = ("peak so far (high-water mark)", "#c44e52", 1.0)
SUMMARY_PEAK = "peak in summary.json (to the end of the test evaluation)"
CELL_HEIGHT = 1.7  # inches per row of timeline panels
HEADER = 0.5  # inches of the timeline's figure for its two-line title
MAX_COLUMNS = 4  # timeline panels per row at most
STATE_COLORS = ("#2ca02c", "#ff7f0e", "#d62728", "#9467bd")


def _measured(run: Run) -> dict[str, float]:
    """GPU allocated and reserved on a GPU run, peak RSS on a CPU run."""
    mem = run.memory()
    gpu = {k: float(mem[k]) for k, _, _ in MEASURED[:2] if mem.get(k)}
    if gpu:
        return gpu
    return {"peak_rss_bytes": float(mem["peak_rss_bytes"])} if mem.get("peak_rss_bytes") else {}


def _state(run: Run) -> dict[str, float]:
    parts = run.memory().get("state_bytes") or {}
    return {k: float(parts[k]) for k, _ in STATE_PARTS if isinstance(parts.get(k), (int, float))}


def _rows(runs: list[Run]) -> tuple[list[tuple[str, dict[str, float], dict[str, float]]], str]:
    """(label, measured, state) per run, or per group (mean over seeds) when there are many runs."""
    if len(runs) <= MAX_BARS:
        return [(r.name, _measured(r), _state(r)) for r in runs], "per run"
    rows = []
    for (_, method, target), members in groups(runs).items():
        rows.append((f"{method} {target * 100:g}%", _mean_dicts([_measured(r) for r in members]),
                     _mean_dicts([_state(r) for r in members])))
    return rows, "mean over seeds per optimizer/method/sparsity"


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: statistics.fmean(d[k] for d in dicts if k in d) for k in keys}


def peak_memory(ctx: Context) -> Figure | str:
    """Horizontal bars: measured peak (left) and the stacked state-bytes breakdown (right), in MiB."""
    rows, how = _rows(ctx.runs)
    if not any(m or s for _, m, s in rows):
        return "no run recorded memory figures (memory missing from every summary)"
    rows = rows[::-1]  # first run at the top
    fig = Figure(figsize=(13, max(3.0, 0.34 * len(rows) + 1.6)))
    left, right = fig.subplots(1, 2, sharey=True)
    ys = list(range(len(rows)))
    kinds = [(k, label, c) for k, label, c in MEASURED if any(k in m for _, m, _ in rows)]
    height = 0.8 / max(1, len(kinds))
    for i, (key, label, color) in enumerate(kinds):
        offset = (i - (len(kinds) - 1) / 2) * height
        values = [m.get(key, 0.0) / MIB for _, m, _ in rows]
        bars = left.barh([y + offset for y in ys], values, height=height, color=color, label=label)
        left.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=7, padding=2)
    for y, (_, m, s) in zip(ys, rows, strict=True):
        for ax, have in ((left, m), (right, s)):
            if not have:
                ax.text(0, y, " not recorded", va="center", fontsize=7, color="gray")
    base = [0.0] * len(rows)
    for (key, label), color in zip(STATE_PARTS, STATE_COLORS, strict=True):
        values = [s.get(key, 0.0) / MIB for _, _, s in rows]
        if any(values):
            right.barh(ys, values, left=base, height=0.7, color=color, label=label)
            base = [b + v for b, v in zip(base, values, strict=True)]
    left.set_yticks(ys, [label for label, _, _ in rows], fontsize=8)
    left.set_xlabel("measured peak memory (MiB): high-water mark over training and test evaluation")
    right.set_xlabel("state bytes (MiB, counted from the tensors)")
    left.set_title("measured peak", fontsize=10)
    right.set_title("state bytes: weights + gradients + optimizer state + pruning buffers", fontsize=10)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.12)
    fig.suptitle(f"{ctx.model}: peak memory ({how})", fontsize=11)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    legend_outside(fig, handles)
    fig.tight_layout()
    ctx.notes.append(PEAK_NOTE)
    draw_notes(fig, ctx.notes)
    return fig


def memory_timeline(ctx: Context) -> Figure | str:
    """Memory vs step (train.jsonl) in small multiples: one panel per optimizer/method and target sparsity,
    its seeds by line style, so that no run hides another. Memory is drawn above a baseline, the smallest
    sample of any run (what the process holds anyway: from zero, differences of a few MiB between runs would
    be invisible); the panels of one counter share their axes, so their heights compare.

    In a panel: memory in use when logged, the high-water mark so far where train.jsonl records it, and
    summary.json's peak at the last step (the same counter, to the end of the test evaluation). Colour tells
    these apart, the same in every panel (the panel's title names its runs), so each legend entry looks
    exactly like the lines it names."""
    curves = [(r, c) for r in ctx.runs if (c := r.curve())]
    panels = [p for p in TIMELINE if any(_number(rec.get(p[0])) for _, c in curves for rec in c)]
    if not panels:
        return "no train.jsonl with memory samples (rss_bytes / cuda_allocated_bytes)"
    rows = cell_rows([r.group[1:] for r, _ in curves])
    # constrained layout keeps the two-line title clear of the panels at every height (tight_layout does not)
    fig = Figure(figsize=(11, CELL_HEIGHT * len(rows) * len(panels) + HEADER), layout="constrained")
    grid = fig.subplots(len(rows) * len(panels), max(len(row) for row in rows), sharex=True, squeeze=False)
    baselines = [_timeline_block(ctx, grid[i * len(rows):(i + 1) * len(rows)], rows, curves, panel)
                 for i, panel in enumerate(panels)]
    _step_labels(grid)
    seeds = "" if _seeds(ctx.runs) == [None] else "; line style = seed"
    above = "; ".join(f"{panel[2]} {base:.1f} MiB" for panel, base in zip(panels, baselines, strict=True))
    fig.suptitle(f"{ctx.model}: memory during training, one panel per optimizer/method and target sparsity{seeds}\n"
                 f"memory above the process baseline, the smallest sample of any run: {above}", fontsize=11)
    legend_outside(fig, _timeline_handles(fig, _seeds(ctx.runs)))
    fig.draw_without_rendering()  # lay the panels out, so that the notes go under them
    draw_notes(fig, ctx.notes)
    return fig


def cell_rows(groups: list[tuple[str, float]]) -> list[list[tuple[str, float]]]:
    """(method, target) panels in rows: a row per method with several targets (by target, so that columns line
    up by sparsity), then the methods with one target (dense runs, say) packed together."""
    targets: dict[str, list[float]] = {}
    for method, target in sorted(set(groups)):
        targets.setdefault(method, []).append(target)
    several = [[(m, t) for t in ts] for m, ts in targets.items() if len(ts) > 1]
    single = [(m, ts[0]) for m, ts in targets.items() if len(ts) == 1]
    width = min(MAX_COLUMNS, max([len(row) for row in several] or [len(single)]))
    return [row[i:i + width] for row in [*several, single] for i in range(0, len(row), width)]


def _timeline_block(ctx: Context, block: Any, rows: list[list[tuple[str, float]]], curves: list[tuple[Run, list]],
                    panel: tuple[str, str, str]) -> float:
    """Draw one counter's panels (rows of cells, one per method and target); return its baseline in MiB."""
    base = min(v for _, curve in curves for key in panel[:2] for _, v in _series(curve, key))
    extremes, shared = [], []
    for cells, axes in zip(rows, block, strict=False):
        for ax in axes[len(cells):]:
            ax.set_visible(False)
        for (method, target), ax in zip(cells, axes, strict=False):
            extremes += [_timeline_run(ax, ctx, run, curve, panel, base)
                         for run, curve in curves if run.group[1:] == (method, target)]
            ax.set_title(f"{method} {sparsity_text(target)}", fontsize=8.5)
            for spine in ax.spines.values():  # the method's colour, as in the other graphs
                spine.set_edgecolor(ctx.colors.get(method) or "black")
            ax.grid(alpha=0.3)
            if shared:
                ax.sharey(shared[0])
            shared.append(ax)
        axes[0].set_ylabel(f"{panel[2]}\nMiB above {base:.1f}", fontsize=8)
    top = max(ax.dataLim.y1 for ax in shared)
    shared[0].set_ylim(0, max(top, 1.0) * 1.08)  # from the baseline: nothing is below it
    _gap_note(ctx, panel[2], extremes)
    return base


def _step_labels(grid: Any) -> None:
    """Step ticks and label under the lowest visible panel of each column (the others share its x axis)."""
    for column in grid.T:
        lowest = [ax for ax in column if ax.get_visible()][-1]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("optimizer step", fontsize=8)


def _timeline_run(ax: Any, ctx: Context, run: Run, curve: list[dict], panel: tuple[str, str, str],
                  base: float) -> tuple:
    """Draw one run's lines above ``base``; return (largest in-use sample, summary peak) in MiB, None where
    absent. Each line's label is its legend entry, its gid the run's name."""
    now_key, peak_key, _ = panel
    style = seed_style(run, ctx.runs)
    now, running = _series(curve, now_key), _series(curve, peak_key)
    for points, (kind, color, width), steps in ((now, IN_USE, "default"), (running, SO_FAR, "steps-post")):
        if points:
            ax.plot([s for s, _ in points], [v - base for _, v in points], color=color, linewidth=width,
                    linestyle=style, drawstyle=steps, label=_kind_label(kind, run, ctx.runs), gid=run.name)
    peak = run.memory().get(peak_key)
    last = max((s for s, _ in now + running), default=None)
    if _number(peak) and last is not None:
        ax.plot([last], [peak / MIB - base], color=SO_FAR[1], marker="D", markersize=5, linestyle="none",
                label=SUMMARY_PEAK, gid=run.name)
    return (max((v for _, v in now), default=None), peak / MIB if _number(peak) else None)


def _seeds(runs: list[Run]) -> list[str | None]:
    """The seeds the legend names, or [None] when there is one seed: then no line names its seed."""
    seeds = sorted({str(r.seed) for r in runs})
    return seeds if len(seeds) > 1 else [None]


def _kind_label(kind: str, run: Run, runs: list[Run]) -> str:
    return kind if _seeds(runs) == [None] else f"{kind}, seed {run.seed}"


def _timeline_handles(fig: Figure, seeds: list[str | None]) -> list[Line2D]:
    """A legend entry per label drawn, in kind then seed order, copying the style of the lines it names."""
    drawn = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    labels = [f"{kind}, seed {s}" if s is not None else kind for kind, _, _ in (IN_USE, SO_FAR) for s in seeds]
    handles = []
    for label in [*labels, SUMMARY_PEAK]:
        if label in drawn:
            line = drawn[label]
            handles.append(Line2D([], [], color=line.get_color(), linewidth=line.get_linewidth(),
                                  linestyle=line.get_linestyle(), marker=line.get_marker(),
                                  markersize=line.get_markersize(), label=label))
    return handles


def _series(curve: list[dict], key: str) -> list[tuple[float, float]]:
    return [(rec["step"], rec[key] / MIB) for rec in curve if _number(rec.get(key)) and _number(rec.get("step"))]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gap_note(ctx: Context, title: str, extremes: list[tuple]) -> None:
    """Say why the summary's peak stands above every in-use sample, when it does by more than GAP."""
    gaps = [(peak, now) for now, peak in extremes if now and peak and peak > GAP * now]
    if gaps:
        peak, now = max(gaps, key=lambda g: g[0] / g[1])
        ctx.notes.append(f"{title}: the peak in summary.json ({peak:.0f} MiB, diamonds) is above the in-use samples "
                         f"(up to {now:.0f} MiB) because they are taken between optimizer steps; the peak is the "
                         "high-water mark, each step's activations and the test evaluation included")
