"""Graphs of a results folder, written to <folder>/graphs/ (matplotlib Agg), from the runs' JSON only.

One set of graphs per model (so accuracy and perplexity never share an axis):
metric vs sparsity (here), training curves (lib/plots_curves.py), peak memory and the
memory timeline (lib/plots_memory.py), memory vs metric (lib/plots_pareto.py). A graph whose data
is absent is skipped; graphs/graphs.json lists what was written, the notes a reader
must see with each graph (coincident series, ties, no spread, the test set's
resolution; lib/plots_marks.py) and why anything was skipped, and the report reads
it. Rendering never raises: a failure becomes a skip reason.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MultipleLocator  # noqa: E402

from lib.plots_marks import (  # noqa: E402
    coincident,
    dodges,
    is_perplexity,
    method_markers,
    resolution_of,
    spread_note,
)
from lib.results import Folder, Metric, Run, Stat, groups, load, metric_of, test_stat  # noqa: E402

MANIFEST = "graphs.json"
LINESTYLES = ("-", "--", ":", "-.")
DPI = 110
MIN_SPAN_STEPS = 10  # an accuracy axis spans at least this many test examples
MAX_MINOR_STEPS = 60  # a minor grid line per test example when the axis spans no more than this
MAX_NOTES_DRAWN = 8  # more notes than this: the figure says how many more graphs.json lists


@dataclass
class Context:
    """What every graph function gets: one model's runs, its metric and the folder-wide colours and
    markers; a graph function appends what the reader must know (coincident series, no spread) to
    ``notes``, which the manifest and the report carry."""

    model: str
    runs: list[Run]
    metric: Metric | None
    colors: dict[str, Any]
    markers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def marker(self, method: str) -> str:
        return self.markers.get(method) or method_markers(list(self.colors) or [method]).get(method, "o")


GraphFn = Callable[[Context], "Figure | str"]  # a figure, or the reason it was skipped


def write_graphs(folder: Path) -> dict[str, Any]:
    """Render every graph of ``folder`` into folder/graphs/; return (and save) the manifest."""
    from lib import plots_memory

    folder = Path(folder)
    data = load(folder)
    out = folder / "graphs"
    manifest: dict[str, Any] = {"graphs": [], "skipped": []}
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        manifest["skipped"].append({"model": "-", "graph": "all graphs", "reason": f"cannot write {out}: {exc}"})
        return manifest
    colors = method_colors(data)
    markers = method_markers([r.method for r in data.runs])
    graphs = graph_functions(plots_memory)
    for model, runs in data.models().items():
        for slug, title, fn in graphs:
            ctx = Context(model, runs, metric_of(runs), colors, markers)
            entry = {"model": model, "graph": title}
            name = f"{slug}_{_safe(model)}.png"
            result = _render(fn, ctx, out / name)
            if result:
                manifest["skipped"].append({**entry, "reason": result})
            else:
                manifest["graphs"].append({**entry, "file": f"graphs/{name}", **({"notes": ctx.notes}
                                                                                  if ctx.notes else {})})
    if not data.runs:
        manifest["skipped"].append({"model": "-", "graph": "all graphs", "reason": "no runs in this folder"})
    written = {Path(g["file"]).name for g in manifest["graphs"]}
    try:
        for stale in out.glob("*.png"):  # graphs of an earlier pass whose data is gone
            if stale.name not in written:
                stale.unlink()
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError:
        pass  # the PNGs that were written stand; the report then says the graphs were not listed
    return manifest


def graph_functions(memory_module: Any = None) -> list[tuple[str, str, GraphFn]]:
    """(file slug, title, function) of every graph, in report order."""
    from lib.plots_curves import training_curves  # imported here: lib/plots_curves.py imports this module

    if memory_module is None:
        from lib import plots_memory as memory_module
    return [
        ("metric_vs_sparsity", "Test metric vs sparsity", metric_vs_sparsity),
        ("peak_memory", "Peak memory and state bytes per run", memory_module.peak_memory),
        ("memory_timeline", "Memory during training", memory_module.memory_timeline),
        ("memory_vs_metric", "Memory vs metric (Pareto front)", memory_module.memory_vs_metric),
        ("training_curves", "Training curves", training_curves),
    ]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """graphs/graphs.json of ``folder``, or None if the graphs were never written."""
    try:
        data = json.loads((Path(folder) / "graphs" / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def method_colors(data: Folder) -> dict[str, Any]:
    """One stable colour per optimizer[/variant]/method across every graph of the folder."""
    import matplotlib as mpl

    methods = sorted({r.method for r in data.runs})
    cmap = mpl.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def metric_label(metric: Metric) -> str:
    unit = f" ({metric.unit})" if metric.unit else ""
    return f"{metric.name}{unit}"


def legend_outside(fig: Figure, handles: list[Any], title: str = "") -> None:
    """A legend to the right of the axes, so it never covers data."""
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title=title,
                   title_fontsize=8, frameon=False)


def draw_notes(fig: Figure, notes: list[str]) -> None:
    """The notes under the axes, wrapped; the first MAX_NOTES_DRAWN, then how many more graphs.json lists."""
    if not notes:
        return
    shown = notes[:MAX_NOTES_DRAWN]
    if len(notes) > len(shown):
        shown.append(f"... and {len(notes) - len(shown)} more (graphs/graphs.json)")
    text = "\n".join(textwrap.fill(n, 130, subsequent_indent="    ") for n in shown)
    box = fig.get_tightbbox()  # inches: below everything drawn so far (axis labels included)
    width, height = fig.get_size_inches()
    fig.text(max(0.0, box.x0 / width), box.y0 / height - 0.1 / height, text, ha="left", va="top", fontsize=7.5,
             color="#333333")


def seed_style(run: Run, runs: list[Run]) -> str:
    """Line style for a run's seed (the same seed looks the same in every method)."""
    seeds = sorted({str(r.seed) for r in runs})
    return LINESTYLES[seeds.index(str(run.seed)) % len(LINESTYLES)]


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


def metric_axis(ax: Any, ctx: Context, means: list[float]) -> None:
    """Log scale for perplexity; for accuracy, the test set's resolution on the axis and in the notes."""
    if is_perplexity(ctx.metric):
        ax.set_yscale("log")
        return
    log_if_wide(ax, means)
    resolution = resolution_of(ctx.runs, ctx.metric)
    if resolution is None or ax.get_yscale() == "log":
        return
    ctx.notes.append(resolution.text(statistics.median(means)))
    lo, hi = ax.get_ylim()
    need = MIN_SPAN_STEPS * resolution.step  # a range of a few test examples must not look like a ranking
    if hi - lo < need:
        top = min(100.0 + resolution.step, (lo + hi + need) / 2)
        ax.set_ylim(top - need, top)
    lo, hi = ax.get_ylim()
    if (hi - lo) / resolution.step <= MAX_MINOR_STEPS:  # ticks on reachable values, a faint line per example
        per_tick = next(k for k in (1, 2, 5, 10, 20, 50, 100) if (hi - lo) / (k * resolution.step) <= 8)
        ax.yaxis.set_major_locator(MultipleLocator(per_tick * resolution.step))
        ax.yaxis.set_minor_locator(MultipleLocator(resolution.step))
        ax.grid(which="minor", axis="y", alpha=0.12)


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


def log_if_wide(ax: Any, values: list[float]) -> None:
    """Log scale when positive values span more than two decades (early perplexity, say)."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


def _render(fn: GraphFn, ctx: Context, path: Path) -> str | None:
    """Draw and save one graph; return why it was skipped, or None when written."""
    try:
        fig = fn(ctx)
        if isinstance(fig, str):
            return fig
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        return None
    except Exception as exc:  # a graph must never stop the report; say why it is absent
        return f"could not be drawn ({type(exc).__name__}: {exc})"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "model"
