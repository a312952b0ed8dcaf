"""Graphs of a results folder, written to <folder>/graphs/ (matplotlib Agg), from the runs' JSON only.

One set of graphs per model (so accuracy and perplexity never share an axis):
metric vs sparsity (metric.py), training curves (curves.py), peak memory and the memory timeline
(memory.py), memory vs metric (pareto.py); what they share is in style.py. A graph whose data
is absent is skipped; graphs/graphs.json lists what was written, the notes a reader
must see with each graph (coincident series, ties, no spread, the test set's
resolution; marks.py) and why anything was skipped, and the report reads
it. Rendering never raises: a failure becomes a skip reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lib.results.plots import memory
from lib.results.plots.curves import training_curves
from lib.results.plots.marks import method_markers
from lib.results.plots.metric import metric_vs_sparsity
from lib.results.plots.style import Context, GraphFn, method_colors
from lib.results import load, metric_of

__all__ = ["Context", "graph_functions", "method_colors", "method_markers", "metric_vs_sparsity", "read_manifest",
           "write_graphs"]

MANIFEST = "graphs.json"
DPI = 110


def write_graphs(folder: Path) -> dict[str, Any]:
    """Render every graph of ``folder`` into folder/graphs/; return (and save) the manifest."""
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
    graphs = graph_functions()
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


def graph_functions() -> list[tuple[str, str, GraphFn]]:
    """(file slug, title, function) of every graph, in report order."""
    return [
        ("metric_vs_sparsity", "Test metric vs sparsity", metric_vs_sparsity),
        ("peak_memory", "Peak memory and state bytes per run", memory.peak_memory),
        ("memory_timeline", "Memory during training", memory.memory_timeline),
        ("memory_vs_metric", "Memory vs metric (Pareto front)", memory.memory_vs_metric),
        ("training_curves", "Training curves", training_curves),
    ]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """graphs/graphs.json of ``folder``, or None if the graphs were never written."""
    try:
        data = json.loads((Path(folder) / "graphs" / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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
