"""Read a results folder for the report, the graphs and the compare view; never fail on bad input.

A results folder may be complete, empty, interrupted (a run folder without a
summary.json or with a truncated one, a metrics.jsonl whose last line was cut
off) or mixed (accuracy and perplexity models side by side). ``load`` returns
what is there and a list of plain-English notes saying what is missing.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.core.errors import HarnessError
from lib.core.units import kib_or_mib
from lib.results.schema import schema_problem


@dataclass
class Run:
    """One run's record (its summary dict, possibly partial) and where its files are."""

    summary: dict[str, Any]
    directory: Path | None = None

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or (self.directory.name if self.directory else "?"))

    @property
    def spec(self) -> dict[str, Any]:
        return self.summary.get("spec") or {}

    @property
    def model(self) -> str:
        return str(self.spec.get("model") or self.name.split("_")[0])

    @property
    def optimizer(self) -> str:
        return str((self.spec.get("optim") or {}).get("name") or "?")

    @property
    def pruning(self) -> str:
        return str((self.spec.get("prune") or {}).get("method") or "?")

    @property
    def variant(self) -> str:
        return str((self.spec.get("prune") or {}).get("variant") or "")

    @property
    def target(self) -> float:
        target = (self.spec.get("prune") or {}).get("target")
        if target is None:
            target = (self.summary.get("sparsity") or {}).get("target", 0.0)
        return float(target or 0.0)

    @property
    def seed(self) -> int | None:
        return self.spec.get("seed")

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "unknown")

    @property
    def method(self) -> str:
        """optimizer[/variant]/pruning: one line of the metric-vs-sparsity graph."""
        return "/".join(p for p in (self.optimizer, self.variant, self.pruning) if p)

    @property
    def group(self) -> tuple[str, str, float]:
        """Everything but the seed: (model, method, target sparsity)."""
        return self.model, self.method, round(self.target, 6)

    def test_value(self) -> float | None:
        """The test metric at the best-by-validation checkpoint (the headline number)."""
        return _metric_value(self.summary, self.summary.get("test_at_best"))

    def best_value(self) -> float | None:
        return _metric_value(self.summary, (self.summary.get("best") or {}).get("val"))

    def memory(self) -> dict[str, Any]:
        return self.summary.get("memory") or {}

    def state_total(self) -> int | None:
        """Sum of the state bytes (weights, gradients, optimizer state, pruning buffers), if recorded."""
        parts = self.memory().get("state_bytes") or {}
        values = [v for v in parts.values() if isinstance(v, (int, float))]
        return int(sum(values)) if values else None

    def peak_bytes(self) -> tuple[str, int] | None:
        """("GPU allocated", n) on a GPU run, ("peak RSS", n) on a CPU run, None if not recorded."""
        mem = self.memory()
        if mem.get("cuda_max_allocated_bytes"):
            return "GPU allocated", int(mem["cuda_max_allocated_bytes"])
        if mem.get("peak_rss_bytes"):
            return "peak RSS", int(mem["peak_rss_bytes"])
        return None

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl records (one per evaluation); a truncated line is skipped."""
        return read_jsonl(self.directory / "metrics.jsonl") if self.directory else []

    def curve(self) -> list[dict[str, Any]]:
        """train.jsonl records (one per log interval); a truncated line is skipped."""
        return read_jsonl(self.directory / "train.jsonl") if self.directory else []


@dataclass
class Metric:
    """The headline metric of a model's runs, from their records."""

    name: str = "metric"
    higher_is_better: bool = True
    unit: str = ""

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def best(self, values: list[float]) -> float:
        return max(values) if self.higher_is_better else min(values)


@dataclass
class Folder:
    """A results folder as read: its runs in order, header fields and notes on what is missing."""

    path: Path
    command: str = ""
    created: str = ""
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def models(self) -> dict[str, list[Run]]:
        """Runs per model, in order of first appearance (one metric per model)."""
        result: dict[str, list[Run]] = {}
        for run in self.runs:
            result.setdefault(run.model, []).append(run)
        return result


def metric_of(runs: list[Run]) -> Metric | None:
    """The metric record of the first run that has one."""
    for run in runs:
        m = run.summary.get("metric")
        if isinstance(m, dict) and m.get("name"):
            return Metric(str(m["name"]), bool(m.get("higher_is_better", True)), str(m.get("unit") or ""))
    return None


def read_json(path: Path) -> tuple[Any, str | None]:
    """(data, None) or (None, why it could not be read)."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({exc})"
    except json.JSONDecodeError:
        return None, "truncated or not JSON"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path``; a half-written line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


STATUSES = ("ok", "diverged", "failed", "unreadable", "incomplete", "stopped", "cut", "running", "queued")


def record_problem(record: Any) -> str | None:
    """What makes ``record`` unusable as a run's summary (its schema broken anywhere, an unknown status), or
    None (lib/results/schema.py)."""
    problem = schema_problem(record)
    if problem is None and record.get("status") not in STATUSES:
        problem = f"has status {record.get('status')!r}, not one of {', '.join(STATUSES)}"
    return problem


@dataclass(frozen=True)
class RunRecord:
    """A run folder's summary.json as its readers need it: the record when it is valid, else why not."""

    record: dict[str, Any] | None  # the valid record, or None
    problem: str | None  # why there is none: "missing", "truncated or not JSON", a broken field, ...
    parsed: bool  # the file held JSON (a problem, if any, is in its content)

    @property
    def missing(self) -> bool:
        return self.problem == "missing"


def run_record(run_dir: Path) -> RunRecord:
    """The one check of "does this run have a valid summary?" (the schema and a known status)."""
    data, why = read_json(run_dir / "summary.json")
    if why is not None:
        return RunRecord(None, why, False)
    problem = record_problem(data)
    return RunRecord(None if problem else data, problem, True)


def unreadable_record(name: str, why: str, last_good: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a run whose summary.json cannot be used; ``last_good`` (an earlier record) is kept whole."""
    if last_good and record_problem(last_good) is None:
        was = last_good.get("recorded_status") or last_good.get("status")
        return {**last_good, "status": "unreadable", "recorded_status": was,
                "error": f"summary.json {why}; the last good record (status {was}) is kept; restore the file or "
                         f"re-run it with `make continue`"}
    return {"name": name, "status": "unreadable", "error": f"summary.json {why}; re-run it with `make continue`",
            "flags": []}


def results_folders(base: Path) -> list[Path]:
    """The results folders under ``base`` (those with a matrix.json), oldest first by their creation stamp."""
    return sorted((p.parent for p in Path(base).glob("*/matrix.json")), key=_created)


def newest_folder(base: Path) -> Path:
    """The newest results folder under ``base`` by creation stamp (not by modification time)."""
    folders = results_folders(base)
    if not folders:
        raise HarnessError(f"no results folder under {base}; run `make` first, or give RESULTS=<dir> "
                           f"or RESULTS_DIR=<folder of results folders>")
    return folders[-1]


def _created(folder: Path) -> tuple[float, str]:
    """matrix.json's "created_unix", else its "created" text, else the folder's name stamp; then the name."""
    matrix, _ = read_json(folder / "matrix.json")
    matrix = matrix if isinstance(matrix, dict) else {}
    if isinstance(matrix.get("created_unix"), (int, float)):
        return float(matrix["created_unix"]), folder.name
    for text, fmt in ((str(matrix.get("created") or ""), "%Y-%m-%dT%H:%M:%S"),
                      ("_".join(folder.name.split("_")[-2:]), "%Y%m%d_%H%M%S")):
        try:
            return time.mktime(time.strptime(text, fmt)), folder.name
        except ValueError:
            continue
    return 0.0, folder.name


def load(folder: Path) -> Folder:
    """Read ``folder``: summary.json if readable, else each run folder's own files."""
    folder = Path(folder)
    result = Folder(folder)
    data, why = read_json(folder / "summary.json")
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        result.command, result.created = str(data.get("command") or ""), str(data.get("created") or "")
        result.runs = [_from_summary(folder, entry) for entry in data["runs"]]
    else:
        result.notes.append(f"summary.json is {why or 'not a results summary'}; read the run folders instead")
        matrix, _ = read_json(folder / "matrix.json")
        if isinstance(matrix, dict):
            result.command, result.created = str(matrix.get("command") or ""), str(matrix.get("created") or "")
        result.runs = [_from_run_dir(d, result.notes) for d in _run_dirs(folder, matrix)]
    for run in result.runs:
        result.notes += _missing(run)
    if not result.runs:
        result.notes.append("no runs in this folder")
    return result


def _from_summary(folder: Path, entry: Any) -> Run:
    problem = record_problem(entry)
    if problem:
        name = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else "?"
        entry = unreadable_record(name, f"entry {problem}")
    run_dir = folder / str(entry.get("name", ""))
    run = Run(dict(entry), run_dir if entry.get("name") and run_dir.is_dir() else None)
    if "spec" not in run.summary and run.directory:  # a failed record written by the matrix has no spec
        spec, _ = read_json(run.directory / "spec.json")
        if isinstance(spec, dict):
            run.summary["spec"] = spec
    return run


def _run_dirs(folder: Path, matrix: Any) -> list[Path]:
    if isinstance(matrix, dict) and isinstance(matrix.get("runs"), list):
        return [folder / str(n) for n in matrix["runs"]]
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and any((d / f).exists() for f in
                                                                    ("spec.json", "summary.json", "metrics.jsonl")))


def _from_run_dir(run_dir: Path, notes: list[str]) -> Run:
    found = run_record(run_dir)
    summary = found.record
    if not found.parsed:
        evals = read_jsonl(run_dir / "metrics.jsonl")
        so_far = f"; metrics.jsonl has {len(evals)} evaluation(s), the last at step {evals[-1].get('step')}" \
            if evals else ""
        notes.append(f"{run_dir.name}: summary.json {found.problem} (interrupted run?); shown as incomplete{so_far}")
        summary = {"name": run_dir.name, "status": "incomplete", "error": f"summary.json {found.problem}", "flags": []}
    elif summary is None:
        notes.append(f"{run_dir.name}: summary.json {found.problem}; shown as unreadable")
        summary = unreadable_record(run_dir.name, found.problem or "")
    run = Run(summary, run_dir if run_dir.is_dir() else None)
    if "spec" not in summary and run.directory:
        spec, _ = read_json(run_dir / "spec.json")
        if isinstance(spec, dict):
            summary["spec"] = spec
    return run


def _missing(run: Run) -> list[str]:
    notes = []
    if run.status == "ok":
        if not run.memory():
            notes.append(f"{run.name}: no memory figures recorded")
        elif run.state_total() is None:
            notes.append(f"{run.name}: no state-bytes breakdown recorded")
        if run.test_value() is None:
            notes.append(f"{run.name}: no test metric at the best checkpoint")
    if run.directory:
        for name in ("metrics.jsonl", "train.jsonl"):
            path = run.directory / name
            if path.exists() and _has_bad_line(path):
                notes.append(f"{run.name}: {name} has a truncated or corrupt line (skipped)")
    return notes


def _has_bad_line(path: Path) -> bool:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return True
    return len(read_jsonl(path)) != len(lines)


def _metric_value(summary: dict[str, Any], values: Any) -> float | None:
    name = (summary.get("metric") or {}).get("name")
    if not isinstance(values, dict) or not name:
        return None
    value = values.get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class Stat:
    """Mean and sample standard deviation (n-1) of one group's values; std is None for n < 2."""

    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 2) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: list[float]) -> Stat | None:
    """Stat of ``values`` (None when empty)."""
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def groups(runs: list[Run]) -> dict[tuple[str, str, float], list[Run]]:
    """Runs grouped by everything but the seed, in order of first appearance."""
    result: dict[tuple[str, str, float], list[Run]] = {}
    for run in runs:
        result.setdefault(run.group, []).append(run)
    return result


def tested_values(runs: list[Run]) -> list[float]:
    """The test metric at best of every run that finished ok (one per seed): what every statistic is of."""
    return [v for r in runs if r.status == "ok" and (v := r.test_value()) is not None]


def test_stat(runs: list[Run]) -> Stat | None:
    """Mean ± std over seeds of the test metric at best, over runs that finished ok."""
    return stat(tested_values(runs))


def mib(n: float | None) -> str:
    """Bytes as text in MiB (KiB below 1 MiB); "-" when unknown."""
    if n is None:
        return "-"
    return kib_or_mib(n)
