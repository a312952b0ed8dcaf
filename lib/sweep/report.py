"""What a sweep writes (lib/sweep/oneshot.py): sweep.json, sweep.md and sweep.png in <run dir>/sweep/, and for
`make sweep RESULTS=<dir>` one combined graph and table in the results folder. From the record only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from lib.core.files import write_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from lib.core.task import Metric  # noqa: E402
from lib.core.units import kib_or_mib, mib  # noqa: E402

COLORS = {"unstructured": "tab:blue", "structured": "tab:red"}  # N:M patterns: tab:green
STYLES = {"magnitude": "-", "gradient-sensitivity": "--", "activation": ":"}
MARKERS = {"magnitude": "o", "gradient-sensitivity": "s", "activation": "^"}  # N:M rows are single points


def write(folder: Path, record: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "sweep.json", record)
    write_text_atomic(folder / "sweep.md", markdown(record))
    fig = graph(record)
    write_atomic(folder / "sweep.png", lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    return folder


def _metric(record: dict[str, Any]) -> Metric:
    return Metric(**record["metric"])


def row_line(metric: Metric, row: dict[str, Any]) -> str:
    """One row, short: its metric, reached sparsity and speed-up."""
    speed = row.get("speed", {})
    up = speed.get("speedup_batch_1")
    int8 = row.get("int8") or {}
    return (f"val {metric.name} {row['val'][metric.name]:.2f}, reached {100 * row['reached_all']:.1f} % of all "
            f"prunable weights, stored {kib_or_mib(row['size']['stored_bytes'])}"
            + (f", speed-up {up:.2f}x at batch 1{_trust(speed)}" if up else "")
            + (f"; int8 val {metric.name} {int8['val'][metric.name]:.2f}, stored "
               f"{kib_or_mib(int8['size']['stored_bytes'])}" if "val" in int8 else ""))


def _trust(speed: dict[str, Any]) -> str:
    """' (unreliable: why)' for a timing the spread or the load discredits (lib/core/timing.py), else ''."""
    return "" if speed.get("reliable", True) else f" (unreliable: {speed.get('unreliable_why')})"


def recommendation_lines(record: dict[str, Any]) -> str:
    """The recommendation, per pattern and overall, as printed at the end of a sweep."""
    metric, rows = _metric(record), record["rows"]
    dense = record["dense"]["val"][metric.name]
    lines = [f"recommended ({record['tolerance']}, whose val {metric.name} is {dense:.2f}):"]
    for pattern, i in record["recommended"].items():
        lines.append(f"  {pattern}: " + ("none within tolerance" if i is None else
                                         f"{100 * rows[i]['target']:g} % ({rows[i]['metric']}), "
                                         f"val {metric.name} {rows[i]['val'][metric.name]:.2f}"))
    if record["overall"] is None:
        lines.append("  overall: prune no further; no row is within tolerance")
    else:
        row, test = rows[record["overall"]["row"]], record["overall"]["test"]
        lines.append(f"  overall: {row['pattern']} {row['metric']} at {100 * row['target']:g} % (reached "
                     f"{100 * row['reached_all']:.1f} %): val {metric.name} {row['val'][metric.name]:.2f}, test "
                     f"{test[metric.name]:.2f}")
        gains = record["overall"].get("buys")
        stored = row["size"]["stored_bytes"] / record["dense"]["size"]["dense_bytes"]
        lines.append(f"  what it buys here: {'; '.join(gains)}" if gains else
                     f"  what it buys here: nothing measured (the same parameters and no reliable speed-up of "
                     f"1.05x or more); stored, it would take {stored:.2f}x of dense")
    return "\n".join(lines)


def markdown(record: dict[str, Any]) -> str:
    metric = _metric(record)
    dense = record["dense"]
    unit = metric.unit
    head = (f"# One-shot sweep of {record['run']}\n\n"
            f"Checkpoint `{record['checkpoint']['path']}` (step {record['checkpoint']['step']}, sha256 "
            f"`{record['checkpoint']['sha256'][:12]}`), {record['checkpoint_sparsity'] * 100:.1f} % sparse; every row "
            f"pruned one-shot from it, no training, evaluated on the validation split; measured on "
            f"{record['device']}. Calibration: {record['calibration']['batches']} training batches of "
            f"{record['calibration']['micro_batch']}.\n\n"
            f"{_reference(record).capitalize()}: val {metric.name} {dense['val'][metric.name]:.2f}{unit}, "
            f"{dense['size']['parameters']:,} parameters, {mib(dense['size']['dense_bytes'])}.\n\n")
    table = [f"| pattern | metric | target | reached | val {metric.name} | vs {_short(record)} | parameters "
             f"| stored (/dense) | latency b1 (speed-up) | throughput (speed-up) |", "|---|---|" + "---:|" * 8]
    for row in record["rows"]:
        table.append(_table_row(metric, dense, row))
    notes = [f"\n{recommendation_lines(record)}\n", "Timings: medians over interleaved repeats; a speed-up is "
             "marked unreliable, and no recommendation rests on it, when either side's interquartile range exceeds "
             "25 % of its median or the load average exceeds the cores (lib/core/timing.py). The overall pick prefers, "
             "among patterns within tolerance, one that buys something measured here (fewer parameters or a "
             "reliable speed-up of 1.05x or more). Reached: zeros among all prunable weights (N:M leaves the "
             "layers M does not divide dense). Stored: unstructured as kept values plus a 1-bit mask, N:M as kept "
             "values plus ceil(log2 M) bits of position each, structured as the smaller model cut out."]
    if record.get("note"):
        notes.append(f"Note: {record['note']}.")
    return head + "\n".join(table) + "\n" + "\n\n".join(notes) + "\n" + int8_table(record) + layer_table(record)


def layer_table(record: dict[str, Any]) -> str:
    """Each layer pruned alone (SWEEP_LAYERS): val metric and drop per sparsity; '' when the sweep had none."""
    layers = record.get("layers")
    if not layers:
        return ""
    metric, sparsities = _metric(record), record["settings"]["sparsities"]
    unit = "points" if metric.higher_is_better else "%"
    lines = ["\n## Per-layer sensitivity (each layer alone pruned by |w|, the others as trained)\n",
             f"Val {metric.name}, and in brackets the drop from {_short(record)} in {unit}; the file "
             f"`layers.json` beside this one feeds CONFIG_SPARSITY_DISTRIBUTION_FILE.\n",
             "| layer | weights | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
             "|---|---:|" + "---:|" * len(sparsities)]
    for name, layer in layers.items():
        cells = [f"{v:.2f} ({d:+.2f})" for v, d in zip(layer["values"], layer["drops"], strict=True)]
        lines.append(f"| {name} | {layer['size']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def int8_table(record: dict[str, Any]) -> str:
    """The rows after torchao int8 (SWEEP_INT8), against dense float32; '' when the sweep had none."""
    metric, dense = _metric(record), record["dense"]
    if "int8" not in dense:
        return ""
    lines = ["\n## After int8 (torchao, Linear weights; convolutions stay float32)\n",
             f"| pattern | metric | target | val {metric.name} float32 | val {metric.name} int8 | int8 - float32 | "
             f"stored int8 (/dense float32) | CPU latency b1 int8, median (IQR) | dense float32 b1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in [{"pattern": "dense", "metric": "", "target": 0.0, **dense}, *record["rows"]]:
        int8 = row.get("int8") or {}
        start = f"| {row['pattern']} | {row['metric']} | {100 * row['target']:g} % |"
        if "val" not in int8:
            lines.append(start + f" {int8.get('skipped') or row.get('skipped') or 'not measured'} | | | | | |")
            continue
        before, after = row["val"][metric.name], int8["val"][metric.name]
        delta = f"{after - before:+.2f}" if metric.higher_is_better else f"{100 * (after / before - 1):+.1f} %"
        ours, theirs = int8["speed"]["timing_batch_1"]["sides"]
        lines.append(start + f" {before:.2f} | {after:.2f} | {delta} | {kib_or_mib(int8['size']['stored_bytes'])} "
                     f"({int8['size']['stored_bytes'] / dense['size']['dense_bytes']:.3f}) | "
                     f"{ours['median_ms']:.2f} ms ({ours['iqr_ms']:.2f}) | {theirs['median_ms']:.2f} ms "
                     f"({theirs['iqr_ms']:.2f}){_trust(int8['speed'])} |")
    lines.append("\nStored int8: a byte per Linear weight kept (unstructured: plus a 1-bit mask; N:M: plus "
                 "ceil(log2 M) bits of position) and a float32 scale per output row; other tensors as float32. "
                 "Latency: torchao's int8 weight-only forward on the CPU (it dequantizes to float32 for the "
                 "matmul), interleaved with the dense float32 model's.")
    return "\n".join(lines) + "\n"


def _table_row(metric: Metric, dense: dict[str, Any], row: dict[str, Any]) -> str:
    start = f"| {row['pattern']} | {row['metric']} | {100 * row['target']:g} % |"
    if "skipped" in row:
        return start + f" skipped: {row['skipped']} | | | | | | |"
    value, base = row["val"][metric.name], dense["val"][metric.name]
    delta = f"{value - base:+.2f}" if metric.higher_is_better else f"{100 * (value / base - 1):+.1f} %"
    size, speed = row["size"], row["speed"]
    return (start + f" {100 * row['reached_all']:.1f} % | {value:.2f} | {delta} | {size['parameters']:,} | "
            f"{mib(size['stored_bytes'])} ({size['stored_bytes'] / dense['size']['dense_bytes']:.3f}) | "
            f"{speed['latency_ms_batch_1']:.2f} ms ({speed['speedup_batch_1']:.2f}x) | "
            f"{speed['throughput']:,.0f} ({speed[_large(speed)]:.2f}x){_trust(speed)}{_sparse_kernels(row)} |")


def _sparse_kernels(row: dict[str, Any]) -> str:
    """A 2:4 row's speed on the GPU's semi-structured sparse kernels (float16, against dense float16)."""
    sparse = row.get("speed_sparse_kernels")
    if not sparse:
        return ""
    if "error" in sparse:
        return f"; 2:4 kernels failed: {sparse['error']}"
    return (f"; 2:4 kernels ({sparse['kernels']}): {sparse['speedup_batch_1']:.2f}x at batch 1, "
            f"{sparse[_large(sparse)]:.2f}x in throughput{_trust(sparse)}")


def _large(speed: dict[str, Any]) -> str:
    return next(k for k in speed if k.startswith("speedup_batch_") and k != "speedup_batch_1")


def graph(record: dict[str, Any]) -> Figure:
    """Validation metric vs reached sparsity: one line per pattern and metric, dense as a reference line."""
    metric = _metric(record)
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    _draw(ax, record, metric)
    ax.axhline(record["dense"]["val"][metric.name], color="black", linewidth=1, label=_short(record))
    if record["overall"] is not None:
        row = record["rows"][record["overall"]["row"]]
        ax.plot([100 * row["reached_all"]], [row["val"][metric.name]], marker="*", markersize=14, color="gold",
                markeredgecolor="black", linestyle="none", label="recommended")
    ax.set_xlabel("sparsity reached (% of prunable weights)")
    ax.set_ylabel(f"val {metric.name}{' (' + metric.unit + ')' if metric.unit else ''}")
    ax.set_title(f"one-shot sweep: {record['run']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _draw(ax: Any, record: dict[str, Any], metric: Metric, run_color: str | None = None) -> None:
    """One line per pattern and metric; with ``run_color`` (the combined graph) one per pattern, in the run's
    colour, at each sparsity the best metric's value, patterns told apart by line style."""
    best_of_metrics = run_color is not None
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in record["rows"]:
        if "val" in row:
            key = (row["pattern"], "best" if best_of_metrics else row["metric"])
            series.setdefault(key, []).append((100 * row["reached_all"], row["val"][metric.name]))
    for (pattern, name), points in series.items():
        if best_of_metrics:  # one point per sparsity: the best metric's
            by_x: dict[float, float] = {}
            for x, y in points:
                by_x[x] = y if x not in by_x or metric.better(y, by_x[x]) else by_x[x]
            points = list(by_x.items())
        points.sort()
        if best_of_metrics:
            style = {"unstructured": "-", "structured": "--"}.get(pattern, ":")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, color=run_color,
                    linestyle=style, label=f"{record['run']}: {pattern}")
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS.get(name, "o"), markersize=4,
                color=COLORS.get(pattern, "tab:green"), linestyle=STYLES.get(name, "-"), label=f"{pattern}, {name}")


def write_combined(folder: Path, records: list[dict[str, Any]]) -> Path:
    """<folder>/graphs/sweep.png (one panel per model, each run's patterns at their best metric) and
    <folder>/sweep.md (each run's recommendation)."""
    models = sorted({r["model"] for r in records})
    fig = Figure(figsize=(7.5, 4.2 * len(models)))
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    for ax, model in zip(axes, models, strict=True):
        ours = [r for r in records if r["model"] == model]
        metric = _metric(ours[0])
        for i, record in enumerate(ours):
            _draw(ax, record, metric, run_color=f"C{i % 10}")
        ax.set_xlabel("sparsity reached (% of prunable weights)")
        ax.set_ylabel(f"val {metric.name}")
        ax.set_title(f"{model}: one-shot sweeps (best importance metric per point)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    (folder / "graphs").mkdir(exist_ok=True)
    path = folder / "graphs" / "sweep.png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    text = "\n\n".join(f"## {r['run']}\n\n{recommendation_lines(r)}" for r in records)
    write_text_atomic(folder / "sweep.md", f"# One-shot sweeps\n\n![sweeps](graphs/sweep.png)\n\n{text}\n")
    return path


def _reference(record: dict[str, Any]) -> str:
    """What rows are compared with: the dense model, or a pruned checkpoint as it was trained."""
    return record.get("reference", "dense")


def _short(record: dict[str, Any]) -> str:
    return "dense" if _reference(record) == "dense" else "checkpoint"

