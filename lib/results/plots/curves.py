"""Training curves of one model's runs: train loss, validation metric, sparsity and learning rate vs step.

Used by lib/results/plots.write_graphs. One line per run: colour = optimizer/method, shade of that colour =
target sparsity (lighter = less sparse; marks.sparsity_shades), line style = seed. The legend
shows each entry with exactly the colours drawn: a method's entry holds its shades side by side, a
sparsity's entry the shade of every method at that sparsity. One line can hide others; the notes name
runs whose training curves coincide, and runs that share a sparsity or learning-rate schedule (expected
across methods, but the reader must know that one line stands for several runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.lines import Line2D

from lib.results.plots.marks import coincident, is_perplexity, runs_text, sparsity_shades, sparsity_text
from lib.results.plots.style import Context, draw_notes, log_if_wide, metric_label, seed_style
from lib.results import Run

XY = tuple[list[float], list[float]]
Record = dict[str, Any]
Pick = Callable[[list[Record], list[Record]], "XY | None"]
Shades = dict[tuple[str, float], tuple[float, float, float]]  # (method, target) -> colour
Entry = tuple[tuple[Line2D, ...], str]  # a legend entry: the lines of its key, its label
MAX_MARKED = 30  # a curve with at most this many points shows the method's marker at each
LINEWIDTH = 1.3
SEGMENT = 1.2  # legend: font sizes of handle per colour shown side by side
SCHEDULES = {"sparsity (%)": "sparsity schedules", "learning rate": "learning-rate schedules"}


def training_curves(ctx: Context) -> Figure | str:
    """Train loss, val metric, sparsity and LR vs step; one line per run (see the module docstring)."""
    data = [(r, r.curve(), r.metrics()) for r in ctx.runs]
    data = [d for d in data if d[1] or d[2]]
    if not data:
        return "no run has train.jsonl or metrics.jsonl"
    shades = sparsity_shades([r.group[1:] for r, _, _ in data], ctx.colors)
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2, sharex=True).flatten()
    schedules = []
    for ax, (label, pick) in zip(axes, _panels(ctx), strict=True):
        series = [(run, xy) for run, curve, metrics in data if (xy := pick(curve, metrics))]
        _draw_panel(ax, ctx, label, series, shades)
        if label in SCHEDULES:
            schedules += _same_series(f"identical {SCHEDULES[label]}", series, [str(r.seed) for r in ctx.runs])
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    runs = [r for r, _, _ in data]
    shaded = "; shade = target sparsity, darker = sparser" if _shaded(runs, shades) else ""
    seeds = "; line style = seed" if len({str(r.seed) for r in runs}) > 1 else ""
    fig.suptitle(f"{ctx.model}: training curves (colour = optimizer/method{shaded}{seeds})", fontsize=11)
    _legend(fig, ctx, runs, shades)
    fig.tight_layout()
    ctx.notes += _same_curves(data) + schedules
    draw_notes(fig, ctx.notes)
    return fig


def _panels(ctx: Context) -> list[tuple[str, Pick]]:
    """(title, pick) per panel; pick gets a run's train.jsonl and metrics.jsonl records."""
    name = ctx.metric.name if ctx.metric else "metric"
    return [
        ("train loss", lambda c, m: _xy(c, "loss") or _xy(m, "train_loss")),
        (f"val {metric_label(ctx.metric) if ctx.metric else name}", lambda c, m: _xy(m, ("val", name))),
        ("sparsity (%)", lambda c, m: _scale(_xy(c, "sparsity") or _xy(m, "sparsity"), 100)),
        ("learning rate", lambda c, m: _xy(c, "lr") or _xy(m, "lr")),
    ]


def _draw_panel(ax: Any, ctx: Context, label: str, series: list[tuple[Run, XY]], shades: Shades) -> None:
    for run, (xs, ys) in series:
        ax.plot(xs, ys, color=shades[run.group[1:]], linestyle=seed_style(run, ctx.runs), linewidth=LINEWIDTH,
                marker=ctx.marker(run.method) if len(xs) <= MAX_MARKED else None, markersize=3.5,
                markerfacecolor="none", label=run.name)
    drawn = [y for _, (_, ys) in series for y in ys]
    if not drawn:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif label.startswith("val") and is_perplexity(ctx.metric):
        ax.set_yscale("log")  # the first evaluations' perplexity would flatten the rest
    elif label.startswith("val"):
        log_if_wide(ax, drawn)
    ax.set_title(label, fontsize=10)
    ax.set_ylabel(label, fontsize=9)
    ax.grid(alpha=0.3)


def _shaded(runs: list[Run], shades: Shades) -> bool:
    """Whether some method is drawn in more than one shade (several target sparsities)."""
    return any(len({shades[r.group[1:]] for r in runs if r.method == m}) > 1 for m in {r.method for r in runs})


def _legend(fig: Figure, ctx: Context, runs: list[Run], shades: Shades) -> None:
    """Method entries, then one per target sparsity when shades are in use, then one per seed's line style
    when there are several seeds; an entry's key holds its colours side by side."""
    entries = _method_entries(ctx, runs, shades) + (_sparsity_entries(runs, shades) if _shaded(runs, shades) else [])
    entries += _seed_entries(ctx, runs)
    widest = max(len(handles) for handles, _ in entries)
    fig.legend(handles=[h for h, _ in entries], labels=[label for _, label in entries], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, handlelength=max(2.0, SEGMENT * widest),
               handler_map={tuple: HandlerTuple(ndivide=None, pad=0)})


def _method_entries(ctx: Context, runs: list[Run], shades: Shades) -> list[Entry]:
    """Per method: each of its shades (one per target sparsity it was run at), with its marker."""
    entries = []
    for method in sorted({r.method for r in runs}):
        targets = sorted({r.target for r in runs if r.method == method})
        entries.append((tuple(Line2D([], [], color=shades[(method, t)], linewidth=LINEWIDTH, marker=ctx.marker(method),
                                     markersize=3.5, markerfacecolor="none") for t in targets), method))
    return entries


def _sparsity_entries(runs: list[Run], shades: Shades) -> list[Entry]:
    """Per target sparsity (dense runs are unshaded): each method's shade at it."""
    entries = []
    for target in sorted({r.target for r in runs if r.target > 0}):
        methods = sorted({r.method for r in runs if r.target == target})
        entries.append((tuple(Line2D([], [], color=shades[(m, target)], linewidth=LINEWIDTH) for m in methods),
                        f"sparsity {sparsity_text(target)}"))
    return entries


def _seed_entries(ctx: Context, runs: list[Run]) -> list[Entry]:
    """A style key per seed, in black, when there are several: the seed's line style is the same in every colour,
    and a key per colour would repeat every method's entry."""
    seeds = {str(r.seed): r for r in runs}
    if len(seeds) < 2:
        return []
    return [((Line2D([], [], color="black", linestyle=seed_style(r, ctx.runs), linewidth=LINEWIDTH),),
             f"seed {s} (line style, any colour)") for s, r in sorted(seeds.items(), key=lambda i: (len(i[0]), i[0]))]


def _same_curves(data: list[tuple[Run, Any, Any]]) -> list[str]:
    """'identical training curves: a = b' for runs whose loss and validation records are the same (one line hides
    the others)."""
    keys = [(run.name, tuple((c.get("step"), c.get("loss")) for c in curve)
             + tuple((m.get("step"), json.dumps(m.get("val"), sort_keys=True)) for m in metrics))
            for run, curve, metrics in data]
    return [f"identical training curves (drawn on top of each other): {' = '.join(same)}"
            for same in coincident(keys)]


def _same_series(what: str, series: list[tuple[Run, XY]], seeds: list[str]) -> list[str]:
    """'<what> (drawn on top of each other): ...' naming each set of runs whose drawn points are the same (of
    the model's ``seeds``)."""
    by_name = {run.name: run for run, _ in series}
    keys = [(run.name, tuple(zip(xs, ys, strict=True))) for run, (xs, ys) in series]
    return [f"{what} (drawn on top of each other): {runs_text([by_name[n] for n in same], seeds)}"
            for same in coincident(keys)]


def _xy(records: list[Record], key: str | tuple[str, str]) -> XY | None:
    xs, ys = [], []
    for rec in records:
        value = rec.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else rec.get(key)
        if isinstance(rec.get("step"), (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(rec["step"])
            ys.append(value)
    return (xs, ys) if xs else None


def _scale(xy: XY | None, factor: float) -> XY | None:
    return (xy[0], [y * factor for y in xy[1]]) if xy else None

