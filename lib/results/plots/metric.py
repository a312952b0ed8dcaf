"""Test metric vs target sparsity: one point per method and sparsity, error bars over seeds."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from lib.results.plots.marks import coincident, dodges, spread_note
from lib.results.plots.style import Context, draw_notes, legend_outside, metric_axis, metric_label
from lib.results import Run, Stat, groups, test_stat


def metric_vs_sparsity(ctx: Context) -> Figure | str:
    """Test metric (at the best-by-validation checkpoint) vs target sparsity; error bars over seeds.

    Every method has its own marker and a small sideways dodge, so identical series stay visible;
    equal values at one sparsity are also listed under the graph (and in graphs.json)."""
    if ctx.metric is None:
        return "no run recorded its metric"
    series = _metric_series(ctx.runs)
    if not series:
        return "no finished run has a test metric at its best checkpoint"
    ticks = sorted({t for points in series.values() for t, _ in points})
    offsets = dodges(list(series), ticks)
    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    for method, points in sorted(series.items()):
        _draw_series(ax, ctx, method, points, offsets[method])
    dense = any(m.endswith("/none") for m in series)
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    dodged = "\neach method's points are shifted sideways a little, so that equal values stay visible"
    ax.set_xlabel("target sparsity" + (" (dense runs at 0%)" if dense else "") + (dodged if len(series) > 1 else ""),
                  fontsize=9)
    ax.set_ylabel(f"test {metric_label(ctx.metric)} at best-val checkpoint")
    seeds = max(s.n for points in series.values() for _, s in points)
    spread = f"mean ± std over up to {seeds} seeds" if seeds > 1 else "one seed: no spread available"
    ax.set_title(f"{ctx.model}: test {ctx.metric.name} vs sparsity ({ctx.metric.direction})\n{spread}", fontsize=10)
    ax.grid(alpha=0.3)
    metric_axis(ax, ctx, [s.mean for points in series.values() for _, s in points])
    ctx.notes += [n for n in [spread_note(seeds)] if n] + _same_values(series)
    if sum(len(points) for points in series.values()) == 1:
        _label_single_point(ax, ctx, series, offsets)
    handles, _ = ax.get_legend_handles_labels()
    legend_outside(fig, handles, "optimizer/method")
    draw_notes(fig, ctx.notes)
    return fig


def _metric_series(runs: list[Run]) -> dict[str, list[tuple[float, Stat]]]:
    """method -> [(target sparsity in %, test stat over seeds), ...] sorted by sparsity."""
    series: dict[str, list[tuple[float, Stat]]] = {}
    for (_, method, target), members in groups(runs).items():
        s = test_stat(members)
        if s is not None:
            series.setdefault(method, []).append((target * 100, s))
    return {m: sorted(points, key=lambda p: p[0]) for m, points in series.items()}


def _draw_series(ax: Any, ctx: Context, method: str, points: list[tuple[float, Stat]], offset: float) -> None:
    color = ctx.colors.get(method)
    dense = method.endswith("/none")
    if dense:
        ax.axhline(points[0][1].mean, color=color, linestyle=":", linewidth=1, alpha=0.6)
    ax.errorbar([t + offset for t, _ in points], [s.mean for _, s in points], yerr=[s.std or 0.0 for _, s in points],
                color=color, marker=ctx.marker(method), markersize=8 if dense else 6, capsize=4, linewidth=1.4,
                alpha=0.9, label=f"{method} (dense)" if dense else method)


def _same_values(series: dict[str, list[tuple[float, Stat]]]) -> list[str]:
    """'same value at 70%: a = b (97.80)' for each set of methods whose points coincide."""
    notes = []
    for target in sorted({t for points in series.values() for t, _ in points}):
        at = {m: s for m, points in series.items() for t, s in points if t == target}
        for same in coincident([(m, (s.mean, s.std)) for m, s in sorted(at.items())]):
            notes.append(f"same value at {target:g}%: {' = '.join(same)} ({at[same[0]].text()})")
    return notes


def _label_single_point(ax: Any, ctx: Context, series: dict[str, list[tuple[float, Stat]]],
                        offsets: dict[str, float]) -> None:
    ((method, [(target, s)]),) = series.items()
    ax.annotate(s.text(), (target + offsets[method], s.mean), textcoords="offset points", xytext=(8, 6), fontsize=9)
    ctx.notes.append(f"one run ({method}): a single point, nothing to compare it with; its training curves "
                     "show how it got there")
