"""Memory graphs of one model's runs: peak memory per run and the memory timeline; memory vs
metric (Pareto) is in lib/plots_pareto.py and re-exported here.

Used by lib/plots.write_graphs; each function returns a Figure or the reason it was skipped.
Measured peaks are GPU max allocated/reserved on a GPU run and peak RSS (whole process,
torch runtime included) on a CPU run: high-water marks from the start of training to the end
of the test evaluation, each step's activations included. The timeline draws the memory in
use when each log line was written (between optimizer steps) and, where train.jsonl records
it, the same high-water mark so far, ending at the summary's peak. State bytes are counted
exactly from the tensors.
"""

from __future__ import annotations

import statistics
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib.plots import Context, draw_notes, legend_outside, seed_style
from lib.plots_pareto import memory_vs_metric, pareto_front
from lib.results import Run, groups

__all__ = ["memory_timeline", "memory_vs_metric", "pareto_front", "peak_memory"]

MiB = 2**20
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
        values = [m.get(key, 0.0) / MiB for _, m, _ in rows]
        bars = left.barh([y + offset for y in ys], values, height=height, color=color, label=label)
        left.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=7, padding=2)
    for y, (_, m, s) in zip(ys, rows, strict=True):
        for ax, have in ((left, m), (right, s)):
            if not have:
                ax.text(0, y, " not recorded", va="center", fontsize=7, color="gray")
    base = [0.0] * len(rows)
    for (key, label), color in zip(STATE_PARTS, STATE_COLORS, strict=True):
        values = [s.get(key, 0.0) / MiB for _, _, s in rows]
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
    """Memory vs step (train.jsonl), from zero: in use when logged, the high-water mark so far where it
    was recorded, and summary.json's peak at the last step (the same counter, to the end of the test)."""
    curves = [(r, r.curve()) for r in ctx.runs]
    panels = [p for p in TIMELINE if any(_number(rec.get(p[0])) for _, c in curves for rec in c)]
    if not panels:
        return "no train.jsonl with memory samples (rss_bytes / cuda_allocated_bytes)"
    methods = sorted({r.method for r, c in curves if c})
    fig = Figure(figsize=(11, max(3.8 * len(panels), 0.2 * (len(methods) + 3) + 1.0)))  # room for the legend
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        extremes = [_timeline_run(ax, ctx, run, curve, panel) for run, curve in curves if curve]
        ax.set_ylim(0, max(ax.dataLim.y1, 1.0) * 1.08)  # from zero: a band of a few MiB must not read as a swing
        ax.set_ylabel(f"{panel[2]} (MiB)")
        ax.set_title(panel[2], fontsize=10)
        ax.grid(alpha=0.3)
        _gap_note(ctx, panel[2], extremes)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(f"{ctx.model}: memory during training (colour = optimizer/method, line style = seed)", fontsize=11)
    running = any(_number(rec.get(p[1])) for p in panels for _, c in curves for rec in c)
    handles = [Line2D([], [], color=ctx.colors.get(m), label=m) for m in methods]  # lines without markers here
    legend_outside(fig, handles + _style_handles(running))
    fig.tight_layout()
    draw_notes(fig, ctx.notes)
    return fig


def _timeline_run(ax: Any, ctx: Context, run: Run, curve: list[dict], panel: tuple[str, str, str]) -> tuple:
    """Draw one run's lines; return (largest in-use sample, summary peak) in MiB (None where absent)."""
    now_key, peak_key, _ = panel
    color, style = ctx.colors.get(run.method), seed_style(run, ctx.runs)
    now = _series(curve, now_key)
    if now:
        ax.plot(*zip(*now, strict=True), color=color, linestyle=style, linewidth=1.3)
    running = _series(curve, peak_key)
    if running:
        ax.plot(*zip(*running, strict=True), color=color, linestyle=style, linewidth=0.8, alpha=0.5,
                drawstyle="steps-post")
    peak = run.memory().get(peak_key)
    last = max((s for s, _ in now + running), default=None)
    if _number(peak) and last is not None:
        ax.plot([last], [peak / MiB], color=color, marker="D", markersize=5, linestyle="none")
    return (max((v for _, v in now), default=None), peak / MiB if _number(peak) else None)


def _series(curve: list[dict], key: str) -> list[tuple[float, float]]:
    return [(rec["step"], rec[key] / MiB) for rec in curve if _number(rec.get(key)) and _number(rec.get("step"))]


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


def _style_handles(running: bool) -> list[Line2D]:
    handles = [Line2D([], [], color="gray", linewidth=1.3, label="in use when logged (between steps)")]
    if running:
        handles.append(Line2D([], [], color="gray", linewidth=0.8, alpha=0.5, label="peak so far (high-water mark)"))
    handles.append(Line2D([], [], color="gray", marker="D", markersize=5, linestyle="none",
                          label="peak in summary.json (to the end of the test evaluation)"))
    return handles
