"""Memory vs metric of one model's runs, with the Pareto front (used by lib/results/plots.write_graphs).

Colour = optimizer/method, marker = target sparsity (no text labels to overprint). Points
with the same memory and metric are drawn side by side (a few pixels apart; their
x value is unchanged) and listed under the graph; ties on the front are all kept and marked.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import ScaledTranslation

from lib.results.plots.marks import coincident, sparsity_markers, spread_note
from lib.results.plots.style import Context, draw_notes, legend_outside, metric_axis, metric_label
from lib.core.units import MIB
from lib.results import Run, Stat, groups, test_stat

SIDE_BY_SIDE_PT = 10.0  # coincident points are drawn this many typographic points apart
STATE_AXIS = "state bytes: weights + gradients + optimizer state + pruning buffers (MiB)"
PEAK_AXIS = "measured peak memory (MiB; GPU allocated, or CPU peak RSS)"


@dataclass(frozen=True)
class Point:
    """One optimizer/method/sparsity: its test stat over seeds and its mean memory in MiB."""

    method: str
    target: float
    stat: Stat
    mib: float

    @property
    def label(self) -> str:
        return f"{self.method} {self.target * 100:g}%"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[bool]:
    """For each (memory, metric) point: True if no other point uses no more memory and scores no worse
    (and is strictly better in one of the two). Points tied in both are therefore all on the front."""
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
    points, axis = _points(ctx.runs)
    if not points:
        return "no finished run has both a test metric and memory figures"
    if len(points) < 2:
        return (f"one point only ({points[0].label}): no front to draw; its memory is in the peak-memory graph "
                "and its metric in the metric-vs-sparsity graph")
    fig = Figure(figsize=(8.5, 5))
    ax = fig.subplots()
    front = pareto_front([(p.mib, p.stat.mean) for p in points], ctx.metric.higher_is_better)
    same = coincident([(p.label, (p.mib, p.stat.mean, p.stat.std)) for p in points])
    shifts = _side_by_side(same)
    markers = sparsity_markers([p.target for p in points])
    for p, on in zip(points, front, strict=True):
        _draw_point(ax, fig, ctx, p, markers[p.target], shifts.get(p.label, 0.0), on)
        if on and p.label in shifts and shifts[p.label] == max(shifts[x] for g in same if p.label in g for x in g):
            ax.annotate("tie", (p.mib, p.stat.mean), textcoords="offset points", xytext=(shifts[p.label] + 9, 7),
                        fontsize=7)
    line = sorted((p.mib, p.stat.mean) for p, on in zip(points, front, strict=True) if on)
    ax.plot([x for x, _ in line], [y for _, y in line], color="black", linestyle="--", linewidth=1, zorder=2)
    ax.update_datalim([(p.mib, p.stat.mean + sign * (p.stat.std or 0.0)) for p in points for sign in (-1, 1)])
    ax.autoscale_view()  # points drawn side by side have their own transform, which autoscaling skips
    _label_axes(ax, ctx, axis)
    metric_axis(ax, ctx, [p.stat.mean for p in points])
    _notes(ctx, points, front, same)
    legend_outside(fig, _handles(ctx, points, markers))
    draw_notes(fig, ctx.notes)
    return fig


def _points(runs: list[Run]) -> tuple[list[Point], str]:
    """Points on the state-bytes axis when any run recorded state bytes, else on the measured peak."""
    rows = []
    for (_, method, target), members in groups(runs).items():
        s = test_stat(members)
        ok = [r for r in members if r.status == "ok"]
        state = [v for r in ok if (v := r.state_total()) is not None]
        peak = [p[1] for r in ok if (p := r.peak_bytes()) is not None]
        if s is not None:
            rows.append((method, target, s, state, peak))
    use_state = any(row[3] for row in rows)
    points = [Point(m, t, s, statistics.fmean(st if use_state else pk) / MIB) for m, t, s, st, pk in rows
              if (st if use_state else pk)]
    return points, STATE_AXIS if use_state else PEAK_AXIS


def _side_by_side(same: list[list[str]]) -> dict[str, float]:
    """label -> sideways shift in points for each group of coincident points, centred on the true x."""
    return {label: (i - (len(group) - 1) / 2) * SIDE_BY_SIDE_PT for group in same for i, label in enumerate(group)}


def _draw_point(ax: Any, fig: Figure, ctx: Context, p: Point, marker: str, shift: float, on: bool) -> None:
    moved = ax.transData + ScaledTranslation(shift / 72, 0, fig.dpi_scale_trans) if shift else ax.transData
    ax.errorbar([p.mib], [p.stat.mean], yerr=[p.stat.std or 0.0], color=ctx.colors.get(p.method), marker=marker,
                markersize=8, capsize=3, linestyle="none", alpha=0.9, transform=moved)
    if on:
        ax.scatter([p.mib], [p.stat.mean], s=190, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3,
                   transform=moved)


def _label_axes(ax: Any, ctx: Context, axis: str) -> None:
    ax.set_xlabel(axis, fontsize=9)
    seeds = "mean ± std over seeds"
    ax.set_ylabel(f"test {metric_label(ctx.metric)} ({seeds})")
    ax.set_title(f"{ctx.model}: memory vs test {ctx.metric.name} ({ctx.metric.direction}; circled = Pareto front)\n"
                 "colour = optimizer/method, marker = target sparsity", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.12)


def _notes(ctx: Context, points: list[Point], front: list[bool], same: list[list[str]]) -> None:
    by_label = {p.label: p for p in points}
    on_front = {p.label for p, on in zip(points, front, strict=True) if on}
    spread = spread_note(max(p.stat.n for p in points))
    ctx.notes += [spread] if spread else []
    ctx.notes.append("Pareto front: a point is on it when no other point uses no more memory and scores no worse; "
                     "points tied in both memory and metric are all kept on it, and listed as ties")
    for group in same:
        p = by_label[group[0]]
        kind = "tie on the Pareto front" if group[0] in on_front else "same memory and metric"
        ctx.notes.append(f"{kind}: {' = '.join(group)} ({p.mib:.3g} MiB, {p.stat.text()}); drawn side by side")


def _handles(ctx: Context, points: list[Point], markers: dict[float, str]) -> list[Line2D]:
    methods = sorted({p.method for p in points})
    handles = [Line2D([], [], color=ctx.colors.get(m), marker="s", linestyle="none", label=m) for m in methods]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="none", label=f"{t * 100:g}% sparsity")
                for t, mk in sorted(markers.items())]
    handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="none",
                          label="Pareto front"))
    return handles
