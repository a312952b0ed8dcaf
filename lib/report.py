"""report.md of a results folder, generated only from its summary.json.

Works for accuracy tasks (higher is better) and perplexity tasks (lower is
better) alike: the metric's name, unit and direction come from each run's record.
Missing fields render as "-" and the report says what is missing; it never fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("run", "status", "best val (step)", "test at best", "sparsity reached / target", "peak memory",
           "throughput", "wall time", "flags")


def write_report(folder: Path) -> Path:
    """Write folder/report.md from folder/summary.json and return its path."""
    summary = json.loads((folder / "summary.json").read_text())
    runs = summary.get("runs", [])
    lines = [f"# Results: {folder.name}", ""]
    lines += [f"Command: `{summary.get('command', '?')}`", f"Created: {summary.get('created', '?')}", ""]
    lines += _status_line(runs)
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in runs]
    lines += ["", "Best val is the best validation metric among evaluations at the target sparsity;",
              "the test metric is measured once, on that checkpoint as saved to disk.", ""]
    config = folder / "config.txt"
    if config.exists():
        lines += ["## Configuration", "", "```", config.read_text().strip(), "```", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _status_line(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return ["No runs in this folder."]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.get("status", "unknown")] = counts.get(r.get("status", "unknown"), 0) + 1
    text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return [f"{len(runs)} run(s): {text}."]


def _metric(run: dict[str, Any], values: dict[str, Any] | None) -> str:
    if not values or "metric" not in run:
        return "-"
    m = run["metric"]
    value = values.get(m["name"])
    return "-" if value is None else f"{m['name']} {value:.2f}{m.get('unit', '')}"


def _row(run: dict[str, Any]) -> list[str]:
    best = run.get("best")
    best_text = f"{_metric(run, best['val'])} ({best['step']})" if best else "-"
    sp = run.get("sparsity") or {}
    sparsity = f"{sp['reached']:.1%} / {sp['target']:.0%}" if "reached" in sp else "-"
    mem = (run.get("memory") or {})
    peak = mem.get("cuda_max_allocated_bytes") or mem.get("peak_rss_bytes")
    tp = run.get("throughput") or {}
    wall = run.get("wall_time_s")
    flags = list(run.get("flags") or [])
    if run.get("status") != "ok" and run.get("error"):
        flags.append(str(run["error"]).replace("|", "/")[:120])
    return [
        run.get("name", "?"), run.get("status", "?"), best_text, _metric(run, run.get("test_at_best")), sparsity,
        f"{peak / 2**20:.0f} MiB" if peak else "-",
        f"{tp['value']:.0f} {tp['unit']}" if tp.get("value") else "-",
        f"{wall:.1f} s" if wall is not None else "-",
        ", ".join(flags) or "-",
    ]
