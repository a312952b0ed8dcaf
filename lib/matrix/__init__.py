"""Expand a Config into RunSpecs, run them each in its own process, resume, summarise.

A results folder holds config.txt, matrix.json (every RunSpec), one folder per
run, summary.json (one entry per run) and report.md. A run that crashes is
recorded as failed and the others go on; `make continue` re-runs only the runs
of the newest folder that have no ok or diverged summary.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Any

from lib import hardware
from lib.config import Config
from lib.core import ROOT, runlock
from lib.core.errors import HarnessError, Interrupted
from lib.core.files import is_disk_full, write_error, write_json_atomic
from lib.core.spec import HardwarePlan, PruneSettings, RunSpec
from lib.core.task import get_task
from lib.matrix import cells, teachers
from lib.matrix.cells import combinations  # noqa: F401 (the matrix's rules, used from here)
from lib.matrix.executors.status import run_state
from lib.pruning import WHOLE_STRUCTURES
from lib.results import read_json, results_folders, run_record, unreadable_record

FINISHED = ("ok", "diverged")


def run_name(model: str, optimizer: str, pruning: str, sparsity: float, seed: int | None, variant: str = "",
             varied: tuple[str, ...] = ()) -> str:
    """<model>_<optimizer>[_<variant>]_<pruning>_<sparsity%>[_<varied setting>...][_s<seed>] (README.md, "What a
    results folder holds"); ``varied``: the settings the list axes vary (lib/matrix/cells.py), e.g. lr0.003."""
    name = f"{model}_{optimizer}{'_' + variant if variant else ''}_{pruning}_{sparsity * 100:g}"
    name += "".join(f"_{t}" for t in varied)
    return name if seed is None else f"{name}_s{seed}"


def expand(config: Config, devices: hardware.Devices | None = None) -> list[RunSpec]:
    """One RunSpec per cell of the matrix (lib/matrix/cells.py), with its hardware plan (one per model)."""
    devices = devices or hardware.detect()
    plans: dict[str, HardwarePlan] = {}
    drafts = []
    for cell in cells.grid(config):
        settings = cells.apply(cell, config)
        drafts.append((cell, RunSpec(
            name="",
            model=cell.model,
            seed=cell.seed,
            optim=settings["optim"],
            prune=PruneSettings(**settings["prune"]),
            train=config.train,
            hardware=UNPLANNED,
            model_options=dict(config.model_options[cell.model]),
            data_dir=_absolute(config.data_dir),
            tracker=config.tracker,
            tracker_project=config.tracker_project,
            wandb_mode=config.wandb_mode,
            surgery=config.surgery,
            sweep=config.sweep,
        )))
    keys = cells.varied([draft for _, draft in drafts])  # over the whole grid: a random draw names alike
    specs = []
    for cell, draft in _named(config, drafts, keys):
        if cell.model not in plans:  # the plan depends on the model, its options and the batch only
            plans[cell.model] = hardware.plan(draft, config.hardware, devices, config.jobs)
        if cell.pruning in BY_MODEL:  # a target or pattern the model cannot hold fails before any run
            _check_units(draft)
        specs.append(dataclasses.replace(draft, hardware=plans[cell.model]))
    return teachers.assign(specs)  # CONFIG_DISTILL: each pruned run's teacher, the teachers first


def _named(config: Config, drafts: list[tuple[cells.Cell, RunSpec]], keys: dict) -> list[tuple]:
    """The chosen cells' drafts, each named by its fixed axes and the settings that vary."""
    picked = set(map(id, cells.chosen(config, [c for c, _ in drafts])))
    tag = len(config.seeds) > 1
    return [(cell, dataclasses.replace(draft, name=run_name(
        cell.model, cell.optimizer, cell.pruning, cell.sparsity, cell.seed if tag else None, cell.variant,
        cells.tokens(draft, keys)))) for cell, draft in drafts if id(cell) in picked]


UNPLANNED = HardwarePlan(device="cpu", micro_batch=1, grad_accum=1)
BY_MODEL = (*WHOLE_STRUCTURES, "nm")  # reach set by the model: its structures; for N:M, layers whose input M divides


def _check_units(spec: RunSpec) -> None:
    """``spec``'s pruner, built once per model and method on the meta device, refuses in one line a
    target it cannot reach (or, for N:M, a model none of whose layers can hold the pattern)."""
    import torch

    from lib.pruning import build_pruner

    key = (spec.model, json.dumps(spec.model_options, sort_keys=True, default=str), spec.prune.method,
           spec.prune.nm_n, spec.prune.nm_m)
    if key not in _UNIT_PRUNERS:
        with torch.device("meta"):
            model = get_task(spec.model).build_model(spec)
        _UNIT_PRUNERS[key] = build_pruner(model, None, dataclasses.replace(spec.prune, target=0.0))
    if spec.prune.method in WHOLE_STRUCTURES:
        _UNIT_PRUNERS[key].check_target(spec.prune.target)


_UNIT_PRUNERS: dict[tuple[str, str, str, int, int], Any] = {}


def dry_run_table(specs: list[RunSpec]) -> str:
    """The matrix as a text table, with each run's hardware plan."""
    keys = cells.varied(specs)
    extra = sorted({key for found in keys.values() for key in found})  # a column per setting a list varies
    rows = [("#", "run", "optimizer", "pruning", "sparsity", *map(cells.column, extra), "seed", "plan")]
    for i, s in enumerate(specs, 1):
        values = cells.settings_of(s, keys)
        shown = [cells.text(values[key]) if key in values else "-" for key in extra]
        rows.append((str(i), s.name, s.optimizer, s.pruning, f"{s.sparsity * 100:g}%", *shown, str(s.seed),
                     short_plan(s.hardware)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short_plan(hw: HardwarePlan) -> str:
    """e.g. "cuda 128x8x1=1024 bf16 compile": micro x accum x ranks = effective batch."""
    extras = [hw.dtype.replace("bfloat", "bf").replace("float", "fp")] + [
        word for word, on in (("fsdp", hw.parallel == "fsdp"), ("compile", hw.compile), ("tf32", hw.tf32),
                              ("probe", hw.probe)) if on]
    return f"{hw.device} {hw.micro_batch}x{hw.grad_accum}x{hw.world_size}={hw.effective_batch} {' '.join(extras)}"


def plan_lines(specs: list[RunSpec]) -> list[str]:
    """Each distinct plan of the matrix with its rationale (one per model)."""
    plans = {s.model: s.hardware for s in specs}
    lines = [f"plan for {model}: {short_plan(hw)}\n  why: {hw.rationale}" for model, hw in plans.items()]
    return lines + _compact_lines([s for s in specs if s.optim.compact_state])


def _compact_lines(specs: list[RunSpec]) -> list[str]:
    """When CONFIG_COMPACT_STATE applies and when it waits (lib/optim/compact.py)."""
    if not specs:
        return []
    dense = sum(s.prune.method == "none" for s in specs)
    return [f"compact optimizer state: {len(specs) - dense} pruned runs keep their moments dense until their masks "
            f"settle (the schedule's end, PRUNING_END), then for the kept weights only"
            + (f"; {dense} runs without pruning stay dense" if dense else "")]


def create_results_folder(config: Config, specs: list[RunSpec], command: str) -> Path:
    """results/<name>_<YYYYmmdd_HHMMSS>/ with config.txt, matrix.json and one spec.json per run."""
    prefix = config.results_name or (config.models[0] if len(config.models) == 1 else "matrix")
    overrides = "".join(f"# override: {k}={v}\n" for k, v in config.overrides.items())
    return new_results_folder(config.results_dir, prefix, specs, command, config.text + overrides)


def new_results_folder(results_dir: str, prefix: str, specs: list[RunSpec], command: str, config_text: str) -> Path:
    """``results_dir``/<prefix>_<YYYYmmdd_HHMMSS>/ with config.txt, matrix.json and one spec.json per run."""
    base = Path(_absolute(results_dir))
    stamp = time.strftime("%Y%m%d_%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
        folder = base / f"{prefix}_{stamp}"
        n = 1
        while folder.exists():
            n += 1
            folder = base / f"{prefix}_{stamp}_{n}"
        folder.mkdir()
        (folder / "config.txt").write_text(config_text)
        for spec in specs:
            (folder / spec.name).mkdir()
            spec.write(folder / spec.name / "spec.json")
        write_json_atomic(folder / "matrix.json", {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "created_unix": time.time(),  # "newest" means this, never a modification time
            "command": command,
            "runs": [s.name for s in specs],
        })
    except OSError as exc:
        if is_disk_full(exc):
            raise write_error(base, exc) from None
        raise HarnessError(f"cannot write results under {base}: {exc.strerror}; "
                           f"set CONFIG_RESULTS_DIR to a writable folder") from None
    return folder


def select(names: list[str], patterns: str) -> list[str]:
    """The run names matching any of the comma-separated globs of ``patterns`` (make ONLY=...), in order."""
    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not chosen:
        sample = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise HarnessError(f"ONLY={patterns!r} matches no run here; the runs are named like {sample} "
                           f"(globs over run names, comma-separated, e.g. ONLY='*_adamw_*')")
    return chosen


def run_folder(folder: Path, jobs: int, only_unfinished: bool = False, executor: Any = None,
               only: str = "") -> list[dict[str, Any]]:
    """Run the folder's runs with ``executor`` (lib/matrix/executors/; local processes, ``jobs`` at a time, by
    default); write summary and report once every run has ended here.

    Refuses a folder another live trainer is working in. Locally, a full disk, Ctrl-C or SIGTERM stops
    every run (none is recorded as failed for it) and `make continue` finishes the folder later. An
    executor that submits and returns (Slurm) leaves the summary to `make report` / `make status`.
    """
    from lib.matrix.executors import LocalExecutor

    executor = executor or LocalExecutor()
    matrix = _read_matrix(folder)
    chosen = select(matrix["runs"], only) if only else matrix["runs"]
    todo = [name for name in chosen if not (only_unfinished and _finished(folder / name))]
    _no_live_jobs(folder, todo)
    for name in matrix["runs"]:  # one driver per folder: another `make` may still be training in it
        runlock.check_free(folder / name)
    for name in todo:  # before launching anything: a damaged folder stops here, nothing half-started
        if not (folder / name / "spec.json").is_file():
            raise HarnessError(f"{folder / name}/spec.json is missing, so that run cannot be (re)started; restore "
                               f"it, or start the experiment again with `make`")
    print(f"{folder}: {len(todo)} of {len(matrix['runs'])} run(s) to do, {jobs} at a time ({executor.name})",
          flush=True)
    node = _node_rank(folder, matrix["runs"])  # several machines: node 0 records, the others only train
    try:
        if not executor.run(folder, todo, jobs, record=node == 0):
            return []  # submitted; the jobs record themselves
    except Interrupted as stop:
        if not node:  # the folder's summary and report name the stopped runs as make status does
            write_summary(folder)
        raise HarnessError(f"{stop}; {folder / 'summary.json'} and report.md say so; `make continue` finishes "
                           f"{folder}") from None
    if node:
        print(f"node {node}: trained as a worker; node 0 writes the results and the report", flush=True)
        return []
    return write_summary(folder)


def _no_live_jobs(folder: Path, names: list[str]) -> None:
    """A run whose Slurm job is still queued or running must not be started a second time."""
    from lib.matrix.executors.slurm import live_jobs

    live = live_jobs(folder, names)
    if live:
        name, job = next(iter(live.items()))
        raise HarnessError(f"{name} is still a Slurm {job} ({len(live)} run(s) of {folder.name} are); wait for them "
                           f"(`make status`) or scancel them, then `make continue`")


def _node_rank(folder: Path, names: list[str]) -> int:
    try:
        return RunSpec.read(folder / names[0] / "spec.json").hardware.node_rank if names else 0
    except HarnessError:
        return 0


def write_summary(folder: Path) -> list[dict[str, Any]]:
    """summary.json (one entry per run, in matrix order), graphs/ and report.md."""
    from lib.results import plots, report

    matrix = _read_matrix(folder)
    last = _last_records(folder)
    runs = [_record_for_summary(folder / name, last.get(name)) for name in matrix["runs"]]
    write_json_atomic(folder / "summary.json", {"folder": folder.name, "command": matrix["command"],
                                                "created": matrix["created"], "runs": runs})
    plots.write_graphs(folder)
    try:
        report.write_report(folder)
    except OSError as exc:
        raise write_error(folder / "report.md", exc) from None
    return runs


def _last_records(folder: Path) -> dict[str, dict[str, Any]]:
    """The folder's summary.json as written last time, by run name (empty when unreadable)."""
    data, _ = read_json(folder / "summary.json")
    entries = data.get("runs") if isinstance(data, dict) else None
    return {e["name"]: e for e in entries or [] if isinstance(e, dict) and isinstance(e.get("name"), str)}


def _record_for_summary(run_dir: Path, last: dict[str, Any] | None) -> dict[str, Any]:
    """A run's record for the folder's summary; a damaged summary.json never downgrades an earlier good one."""
    found = run_record(run_dir)
    if found.record is not None:
        return found.record
    if found.missing:
        state, detail = run_state(run_dir)  # the word `make status` uses: stopped, cut, running, ...
        had_result = bool(last) and last.get("status") in (*FINISHED, "unreadable")
        if state in ("cut", "running", "stopped") or not had_result:
            return {"name": run_dir.name, "status": state, "error": detail, "flags": []}
    return unreadable_record(run_dir.name, "is missing" if found.missing else found.problem or "", last)


def newest_unfinished(results_dir: str) -> Path:
    """The newest results folder (by creation stamp) that has runs without an ok or diverged summary."""
    base = Path(_absolute(results_dir))
    for folder in reversed(results_folders(base)):
        names = _read_matrix(folder)["runs"]
        if not all(_finished(folder / n) for n in names):
            return folder
    raise HarnessError(f"no unfinished results folder under {base}; start a new matrix with `make`")


def run_names(folder: Path) -> list[str]:
    """The runs of a results folder, in matrix order."""
    return list(_read_matrix(folder)["runs"])


def _finished(run_dir: Path) -> bool:
    record = run_record(run_dir).record
    return record is not None and record["status"] in FINISHED


def _read_matrix(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "matrix.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise HarnessError(f"{folder} is not a results folder made by `make` (no readable matrix.json)") from None


def _absolute(path: str) -> str:
    return str(path if os.path.isabs(path) else ROOT / path)
