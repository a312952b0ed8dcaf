"""Memory graphs of one model's runs: peak memory per run, memory timeline, memory vs metric (Pareto).

Used by lib/plots.write_graphs; each function returns a Figure or the reason it was skipped.
Measured peaks are GPU max allocated/reserved on a GPU run and peak RSS (whole process,
torch runtime included) on a CPU run; state bytes are counted exactly from the tensors.
"""

from __future__ import annotations

import statistics

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lib.plots import Context, legend_outside, method_handles, metric_label, seed_style
from lib.results import Run, groups, test_stat

MiB = 2**20
MAX_BARS = 40  # more runs than this: one bar per group (mean over seeds) instead of per run
STATE_PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer_state", "optimizer state"),
               ("pruning_buffers", "pruning buffers"))
MEASURED = (("cuda_max_allocated_bytes", "GPU max allocated", "#1f77b4"),
            ("cuda_max_reserved_bytes", "GPU max reserved", "#aec7e8"),
            ("peak_rss_bytes", "CPU peak RSS (process)", "#7f7f7f"))
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
    left.set_xlabel("measured peak memory (MiB)")
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
    return fig


def memory_timeline(ctx: Context) -> Figure | str:
    """Memory in use vs step (train.jsonl): GPU allocated when recorded, process RSS always."""
    curves = [(r, r.curve()) for r in ctx.runs]
    keys = [(k, label) for k, label in (("cuda_allocated_bytes", "GPU allocated"), ("rss_bytes", "process RSS"))
            if any(isinstance(rec.get(k), (int, float)) for _, c in curves for rec in c)]
    if not keys:
        return "no train.jsonl with memory samples (rss_bytes / cuda_allocated_bytes)"
    fig = Figure(figsize=(11, 3.8 * len(keys)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, label) in zip(axes, keys, strict=True):
        for run, curve in curves:
            pts = [(rec["step"], rec[key] / MiB) for rec in curve
                   if isinstance(rec.get(key), (int, float)) and isinstance(rec.get("step"), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=ctx.colors.get(run.method),
                        linestyle=seed_style(run, ctx.runs), linewidth=1.2)
        ax.set_ylabel(f"{label} (MiB)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(f"{ctx.model}: memory during training (colour = optimizer/method, line style = seed)", fontsize=11)
    legend_outside(fig, method_handles(ctx, sorted({r.method for r, c in curves if c})))
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[bool]:
    """For each (memory, metric) point: True if no other point uses no more memory and scores no worse
    (and is strictly better in one of the two)."""
    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(xj <= x and better_or_equal(yj, y) and (xj < x or yj != y)
                        for j, (xj, yj) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def memory_vs_metric(ctx: Context) -> Figure | str:
    """Mean test metric vs mean state bytes per optimizer/method/sparsity, the Pareto front marked."""
    if ctx.metric is None:
        return "no run recorded its metric"
    points = []
    for (_, method, target), runs in groups(ctx.runs).items():
        s = test_stat(runs)
        ok = [r for r in runs if r.status == "ok"]
        state = [v for r in ok if (v := r.state_total()) is not None]
        peak = [p[1] for r in ok if (p := r.peak_bytes()) is not None]
        if s is not None:
            points.append((method, target, s, state, peak))
    use_state = any(p[3] for p in points)
    axis = ("state bytes: weights + gradients + optimizer state + pruning buffers (MiB)" if use_state
            else "measured peak memory (MiB; GPU allocated, or CPU peak RSS)")
    drawn = [(m, t, s, statistics.fmean(st if use_state else pk) / MiB) for m, t, s, st, pk in points
             if (st if use_state else pk)]
    if not drawn:
        return "no finished run has both a test metric and memory figures"
    fig = Figure(figsize=(8.5, 5))
    ax = fig.subplots()
    front = pareto_front([(x, s.mean) for _, _, s, x in drawn], ctx.metric.higher_is_better)
    for (method, target, s, x), on in zip(drawn, front, strict=True):
        ax.errorbar([x], [s.mean], yerr=[s.std or 0.0], color=ctx.colors.get(method), marker="o", capsize=3)
        ax.annotate(f"{target * 100:g}%", (x, s.mean), textcoords="offset points", xytext=(6, 4), fontsize=7)
        if on:
            ax.scatter([x], [s.mean], s=160, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    line = sorted((x, s.mean) for (_, _, s, x), on in zip(drawn, front, strict=True) if on)
    ax.plot([p[0] for p in line], [p[1] for p in line], color="black", linestyle="--", linewidth=1, zorder=2)
    ax.set_xlabel(axis, fontsize=9)
    ax.set_ylabel(f"test {metric_label(ctx.metric)} (mean ± std over seeds)")
    ax.set_title(f"{ctx.model}: memory vs test {ctx.metric.name} ({ctx.metric.direction}; "
                 f"circled = Pareto front)\nlabels = target sparsity", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    handles = method_handles(ctx, sorted({d[0] for d in drawn}))
    handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="none",
                          label="Pareto front"))
    legend_outside(fig, handles)
    return fig

