"""report.md of a results folder, generated only from its runs' JSON (and graphs/graphs.json).

Works for accuracy tasks (higher is better) and perplexity tasks (lower is better)
alike: the metric's name, unit and direction come from each run's record, and a
folder holding several models gets one section (tables and graphs) per model.
Missing fields render as "-" and the report says what is missing; it never fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib.results.compare import by_validation, method_groups, tied
from lib.results.plots import read_manifest
from lib.results import Folder, Metric, Run, Stat, groups, load, lmeval, metric_of, mib, read_json, stat, test_stat

FLAGGED = ("failed", "diverged", "incomplete", "unknown", "unreadable", "stopped", "cut", "running", "queued")
WALL = "wall time (training loop)"
WALL_NOTE = ("Wall time (training loop) is the run's own `wall_time_s`: from its first training step to its last, "
             "the validation evaluations and checkpoint saves included; process start, data loading, model "
             "building and the test evaluation are not in it, so the console's per-run time (launch to exit) "
             "is longer.")


def write_report(folder: Path) -> Path:
    """Write folder/report.md and return its path (graphs are embedded if graphs/ was written)."""
    folder = Path(folder)
    path = folder / "report.md"
    path.write_text(render(folder))
    return path


def render(folder: Path) -> str:
    """The report's Markdown text."""
    data = load(folder)
    lines = [f"# Results: {Path(folder).name}", ""]
    lines += [f"Command: `{data.command or 'unknown'}`  ", f"Created: {data.created or 'unknown'}  ",
              *made_by(data.runs), ""]
    lines += _status_line(data.runs) + [""]
    if data.notes:
        lines += ["## What is missing", ""] + [f"- {n}" for n in data.notes] + [""]
    lines += _flags(data.runs)
    manifest = read_manifest(folder)
    for model, runs in data.models().items():
        metric = metric_of(runs)
        lines += _model_section(model, runs, metric)
        lines += _graphs(manifest, model)
    lines += _provenance(data)
    return "\n".join(lines) + "\n"


def made_by(runs: list[Run]) -> list[str]:
    """The provenance header: commit, software, device and data of the runs (each distinct value once)."""
    found = [r.summary.get("provenance") for r in runs if isinstance(r.summary.get("provenance"), dict)]
    if not found:
        return ["Provenance: not recorded (runs made before provenance was kept)"]

    def distinct(text_of: Any) -> str:
        return " / ".join(dict.fromkeys(text_of(p) for p in found))

    def code(p: dict) -> str:
        commit = (p.get("commit") or "unknown")[:12]
        return commit + (" with uncommitted changes" if p.get("dirty") else " (clean)" if p.get("dirty") is False
                         else "")

    def software(p: dict) -> str:
        v = p.get("versions") or {}
        return f"python {v.get('python')}, torch {v.get('torch')}, numpy {v.get('numpy')}"

    def data(p: dict) -> str:
        d = p.get("data") or {}
        return f"{d.get('source', '?')} train {str(d.get('train_sha256', '?'))[:12]}"

    def machine(p: dict) -> str:
        return f"{p.get('device')}, {p.get('threads')} thread(s), world size {p.get('world_size')}"

    return [f"Commit: {distinct(code)}  ", f"Software: {distinct(software)}  ", f"Device: {distinct(machine)}  ",
            f"Data: {distinct(data)}"]


def _status_line(runs: list[Run]) -> list[str]:
    if not runs:
        return ["No runs in this folder: nothing to report."]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return [f"{len(runs)} run(s): {text}."]


def _flags(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        flags = ([r.status] if r.status in FLAGGED else []) + [str(f) for f in r.summary.get("flags") or []]
        if flags:
            rows.append([r.name, r.status, ", ".join(flags), _cell(r.summary.get("error") or "-")])
    if not rows:
        return ["No run failed, diverged or missed its sparsity.", ""]
    return ["## Flags", ""] + _table(["run", "status", "flags", "error"], rows) + [""]


def _model_section(model: str, runs: list[Run], metric: Metric | None) -> list[str]:
    title = f"{metric.name} ({metric.direction})" if metric else "no metric recorded"
    lines = [f"## {model}: {title}", ""]
    name = _metric_head(metric)
    head = ["run", "status", "optimizer", "variant", "pruning", "target", "seed", f"best val {name} (step)",
            f"test {name} at best", "sparsity reached / target", "peak memory", "state bytes", "throughput",
            WALL]
    lines += ["### Runs", ""] + _table(*_drop_empty("variant", head, [_run_row(r) for r in runs])) + [""]
    lines += ["Best val is the best validation metric among evaluations at the target sparsity; the test "
              "metric is measured once, on that checkpoint as saved to disk. " + WALL_NOTE, ""]
    lines += ["### Per method (mean ± std over seeds)", ""]
    head = ["optimizer", "variant", "pruning", "target", "seeds ok / runs", f"test {name}", f"best val {name}",
            "sparsity reached", "peak memory", "state bytes", "throughput", WALL]
    lines += _table(*_drop_empty("variant", head, [_group_row(members) for members in groups(runs).values()]))
    lines += [""]
    lines += ["Mean ± sample std (n-1) over the seeds that finished ok; a single seed shows no ±. "
              "Failed and diverged runs are excluded from the means and listed under Flags.", ""]
    return (lines + _best_per_sparsity(runs, metric) + _structures(runs) + _patterns(runs) + _layers(runs)
            + _surgeries(runs) + _lm_eval(runs))


def _structures(runs: list[Run]) -> list[str]:
    """What structured and layer-dropout runs removed, unit by unit kind (summary.json's sparsity entry)."""
    found = [(r, (r.summary.get("sparsity") or {}).get("structures")) for r in runs]
    rows = [[r.name] + [", ".join(f"{kind}: {c.get('removed', '?')} of {c.get('total', '?')} masked"
                                  + (f", {cut} cut by surgery" if (cut := _cut_units(r).get(kind)) else "")
                                  for kind, c in counts.items())] for r, counts in found if isinstance(counts, dict)]
    if not rows:
        return []
    return ["### Whole units removed", ""] + _table(["run", "units removed"], rows) + [
        "", "Masked during training: the weights of these units, their gradients and optimizer state are zero, "
        "so the model computes what the smaller model without them computes. Cut by surgery: physically removed "
        "at a checkpoint (the totals are of the model after the cuts).", ""]


def _cut_units(run: Run) -> dict[str, int]:
    """Units each checkpoint-time surgery of ``run`` removed, by kind, added up."""
    found: dict[str, int] = {}
    for cut in run.summary.get("surgery") or []:
        for kind, n in (cut.get("removed") or {}).items():
            found[kind] = found.get(kind, 0) + int(n)
    return found


def _patterns(runs: list[Run]) -> list[str]:
    """N:M runs: the pattern, the weights it covers and the layers too narrow for it (left dense)."""
    rows = []
    for r in runs:
        entry = r.summary.get("sparsity") or {}
        if isinstance(entry, dict) and entry.get("pattern"):
            dense = ", ".join(f"{name} ({dim} inputs)" for name, dim in (entry.get("dense_layers") or {}).items())
            covered = entry.get("covered_weights")
            rows.append([r.name, str(entry["pattern"]), f"{covered:,}" if isinstance(covered, int) else "?",
                         dense or "none"])
    if not rows:
        return []
    return ["### N:M patterns", ""] + _table(["run", "pattern", "weights in the pattern", "layers left dense"],
                                             rows) + [
        "", "Sparsity reached counts the weights in the pattern; a layer whose input dimension M does not "
        "divide cannot hold it and stays dense.", ""]


def _layers(runs: list[Run]) -> list[str]:
    """Runs with a per-layer distribution (CONFIG_SPARSITY_DISTRIBUTION): each layer's target and reached
    sparsity, a column per run."""
    found = [(r, entry) for r in runs if isinstance(entry := (r.summary.get("sparsity") or {}), dict)
             and isinstance(entry.get("layers"), dict)]
    if not found:
        return []
    names = list(dict.fromkeys(name for _, entry in found for name in entry["layers"]))
    rows = [[name] + [_layer_cell(entry["layers"].get(name)) for _, entry in found] for name in names]
    sources = [f"{r.name}: {entry['source']}" for r, entry in found if entry.get("source")]
    return ["### Per-layer sparsity (target / reached, %)", ""] + _table(
        ["layer"] + [f"{r.name} ({entry.get('distribution', '?')})" for r, entry in found], rows) + [
        "", "Each layer pruned to its own count; the counts add up to the overall target exactly (the rounding "
        "remainder goes to the largest layers)." + ("" if not sources else " Sensitivity files: "
                                                     + "; ".join(sources) + "."), ""]


def _layer_cell(layer: dict[str, Any] | None) -> str:
    if not isinstance(layer, dict):
        return "-"
    return f"{100 * layer.get('target', float('nan')):.1f} / {100 * layer.get('reached', float('nan')):.1f}"


def _surgeries(runs: list[Run]) -> list[str]:
    """Checkpoint-time surgeries the runs went through (summary.json's "surgery"; `make surgery`)."""
    rows = []
    for r in runs:
        for s in r.summary.get("surgery") or []:
            removed = ", ".join(f"{n} {kind}s" for kind, n in (s.get("removed") or {}).items())
            loss = s.get("val_loss") or {}
            rows.append([r.name, str(s.get("step", "?")), s.get("source", "?"), removed,
                         f"{loss.get('before', float('nan')):.4f} -> {loss.get('after', float('nan')):.4f}"])
    if not rows:
        return []
    return ["### Checkpoint-time surgery", ""] + _table(
        ["run", "at step", "chosen from", "removed", "val loss before -> after the cut"], rows) + [
        "", "Structures physically removed at a checkpoint, training then resumed on the smaller model; "
        "each run's surgery.json holds the before/after measurements.", ""]


def _lm_eval(runs: list[Run]) -> list[str]:
    """lm-evaluation-harness results of the runs that `make eval` evaluated (<run>/eval/lm_eval.json)."""
    table, stamps = [], []
    for r in runs:
        record, _ = read_json(r.directory / "eval" / "lm_eval.json") if r.directory else (None, None)
        if isinstance(record, dict):
            table += [[r.name, *row] for row in lmeval.rows(record)]
            stamps.append(f"{r.name}: lm-eval {record.get('lm_eval_version')}, {record.get('device')}, "
                          f"{record.get('date')}")
    if not table:
        return []
    return ["### lm-evaluation-harness (`make eval`)", ""] + _table(
        ["run", "task", "metric", "value", "stderr", "samples"], table) + ["", "; ".join(stamps), ""]


def _best_per_sparsity(runs: list[Run], metric: Metric | None) -> list[str]:
    """The best method at each target sparsity, picked by mean best-validation metric (never by test); its test
    metric is reported as the value at the chosen checkpoints. Equal means are listed together as a tie."""
    if metric is None:
        return []
    groups = method_groups(runs)
    lines = [f"Best method per target sparsity, picked by mean best-validation {metric.name} ({metric.direction}; "
             f"never by test; a tie lists every method with the same mean). Test is the value at the "
             f"validation-chosen checkpoints; `make compare` ranks every method with stated tests:", ""]
    for target in sorted({g.target for g in groups}):
        ranked = by_validation([g for g in groups if g.target == target], metric)
        if not ranked:
            continue
        best = stat(list(ranked[0].val.values())).mean
        leaders = [g for g in ranked if tied(stat(list(g.val.values())).mean, best)]
        text = "; ".join(f"{g.label}: val {stat(list(g.val.values())).text()}, test "
                         f"{_stat(stat(list(g.test.values())))}" for g in leaders)
        lines.append(f"- {target:.0%}: " + (f"tie between {len(leaders)} methods, " if len(leaders) > 1 else "")
                     + text)
    return lines + [""]


def _metric_head(metric: Metric | None) -> str:
    if metric is None:
        return "metric"
    return f"{metric.name} ({metric.unit})" if metric.unit else metric.name


def _run_row(r: Run) -> list[str]:
    best = r.summary.get("best") or {}
    best_value = r.best_value()
    sp = r.summary.get("sparsity") or {}
    reached = sp.get("reached")
    cut = sp.get("cut_by_surgery") or 0  # where the figure comes from: zeros, or weights surgery removed
    sparsity = (f"{reached:.1%}{f' ({cut:.1%} cut by surgery)' if cut else ''} / {r.target:.0%}"
                if isinstance(reached, (int, float)) else f"- / {r.target:.0%}")
    tp = r.summary.get("throughput") or {}
    wall = r.summary.get("wall_time_s")
    return [
        r.name, r.status, r.optimizer, r.variant or "-", r.pruning, f"{r.target:.0%}",
        str(r.seed if r.seed is not None else "-"),
        f"{best_value:.2f} ({best.get('step', '?')})" if best_value is not None else "-",
        _num(r.test_value()), sparsity, _peak(r), mib(r.state_total()),
        _throughput(tp, r.summary.get("mfu")),
        f"{wall:.1f} s" if isinstance(wall, (int, float)) else "-",
    ]


def _throughput(tp: dict, mfu: dict | None) -> str:
    """e.g. "182,044 tokens/s (MFU 41.2 %)"; the MFU only where the run measured one (16-bit on a known GPU)."""
    if not isinstance(tp.get("value"), (int, float)):
        return "-"
    text = f"{tp['value']:,.0f} {tp.get('unit', '')}".rstrip()
    if isinstance(mfu, dict) and isinstance(mfu.get("value"), (int, float)):
        text += f" (MFU {mfu['value']:.1%} of {mfu.get('gpu', '?')})"
    return text


def _group_row(runs: list[Run]) -> list[str]:
    first = runs[0]
    ok = [r for r in runs if r.status == "ok"]
    reached = stat([v * 100 for r in ok if isinstance(v := (r.summary.get("sparsity") or {}).get("reached"),
                                                      (int, float))])
    peaks = stat([p[1] for r in ok if (p := r.peak_bytes())])
    states = stat([s for r in ok if (s := r.state_total()) is not None])
    tps = stat([v for r in ok if isinstance(v := (r.summary.get("throughput") or {}).get("value"), (int, float))])
    walls = stat([v for r in ok if isinstance(v := r.summary.get("wall_time_s"), (int, float))])
    unit = next(((r.summary.get("throughput") or {}).get("unit", "") for r in ok), "")
    return [
        first.optimizer, first.variant or "-", first.pruning, f"{first.target:.0%}", f"{len(ok)} / {len(runs)}",
        _stat(test_stat(runs)), _stat(stat([v for r in ok if (v := r.best_value()) is not None])),
        f"{reached.mean:.1f}%" if reached else "-",
        mib(peaks.mean) if peaks else "-", mib(states.mean) if states else "-",
        f"{tps.mean:,.0f} {unit}".rstrip() if tps else "-", f"{walls.mean:.1f} s" if walls else "-",
    ]


def _peak(r: Run) -> str:
    mem = r.memory()
    alloc, reserved = mem.get("cuda_max_allocated_bytes"), mem.get("cuda_max_reserved_bytes")
    if alloc:
        return f"{mib(alloc)} alloc / {mib(reserved)} reserved (GPU)"
    peak = mem.get("peak_rss_bytes")
    return f"{mib(peak)} RSS (CPU)" if peak else "-"


def _graphs(manifest: dict[str, Any] | None, model: str) -> list[str]:
    lines = ["### Graphs", ""]
    if manifest is None:
        return lines + ["No graphs yet: run `make graphs` to draw them.", ""]
    for g in manifest.get("graphs", []):
        if g.get("model") == model:
            lines += [f"![{g.get('graph', '')}]({g.get('file', '')})", ""]
            notes = g.get("notes") if isinstance(g.get("notes"), list) else []
            lines += [f"- {_cell(n)}" for n in notes] + ([""] if notes else [])
    skipped = [g for g in manifest.get("skipped", []) if g.get("model") in (model, "-")]
    lines += [f"- {g.get('graph')}: not drawn, {g.get('reason')}" for g in skipped]
    if any(g.get("model") == model and "Pareto" in g.get("graph", "") for g in manifest.get("graphs", [])):
        lines += ["", "Memory vs metric: the memory axis is the runs' state bytes (weights + gradients + "
                  "optimizer state + pruning buffers, counted exactly), or the measured peak when no run "
                  "recorded state bytes; the axis label says which. A point is on the Pareto front when no "
                  "other point uses no more memory and scores no worse; points tied in both memory and "
                  "metric are all kept on the front and listed as ties under the graph."]
    return lines + [""]


def _provenance(data: Folder) -> list[str]:
    lines = ["## How this was produced", "", "```", data.command or "(command not recorded)", "```", ""]
    config = data.path / "config.txt"
    try:
        text = config.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return lines + ["config.txt is missing: the .config that produced these runs is unknown.", ""]
    return lines + ["The .config used (config.txt):", "", "```", text, "```", ""]


def _stat(s: Stat | None) -> str:
    return s.text() if s else "-"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cell(text: Any) -> str:
    return " ".join(str(text).replace("|", "/").split())[:300]


def _drop_empty(column: str, head: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Leave out ``column`` when no row has a value in it (e.g. variant, outside AdamWPrune state pruning)."""
    i = head.index(column)
    if any(row[i] != "-" for row in rows):
        return head, rows
    return head[:i] + head[i + 1:], [row[:i] + row[i + 1:] for row in rows]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(no runs)"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
