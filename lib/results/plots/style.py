"""What every graph shares: the Context a graph function gets, colours, line styles, legends, notes and
the metric axis. Each graph module imports this one, never the package (lib/results/plots/__init__.py), so
the package can import every graph without a circle."""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MultipleLocator  # noqa: E402

from lib.results.plots.marks import is_perplexity, method_markers, resolution_of  # noqa: E402
from lib.results import Folder, Metric, Run  # noqa: E402

LINESTYLES = ("-", "--", ":", "-.")
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


def log_if_wide(ax: Any, values: list[float]) -> None:
    """Log scale when positive values span more than two decades (early perplexity, say)."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
