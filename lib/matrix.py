"""Expand a Config into RunSpecs, run them each in its own process, resume, summarise.

A results folder holds config.txt, matrix.json (every RunSpec), one folder per
run, summary.json (one entry per run) and report.md. A run that crashes is
recorded as failed and the others go on; `make continue` re-runs only the runs
of the newest folder that have no ok or diverged summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lib import distributed, hardware
from lib.config import Config
from lib.errors import HarnessError
from lib.kconf import ROOT
from lib.run import RANK_FAILED, failed_summary
from lib.spec import HardwarePlan, PruneSettings, RunSpec, write_json_atomic

FINISHED = ("ok", "diverged")


def run_name(model: str, optimizer: str, pruning: str, sparsity: float, seed: int | None, variant: str = "") -> str:
    """<model>_<optimizer>[_<variant>]_<pruning>_<sparsity%>[_s<seed>] (DESIGN.md, Results folder)."""
    name = f"{model}_{optimizer}{'_' + variant if variant else ''}_{pruning}_{sparsity * 100:g}"
    return name if seed is None else f"{name}_s{seed}"


def valid_pair(optimizer: str, pruning: str) -> bool:
    """State pruning needs AdamWPrune's moments; AdamWPrune prunes only from them (or not at all)."""
    if pruning == "state":
        return optimizer == "adamwprune"
    return optimizer != "adamwprune" or pruning == "none"


def _variants(config: Config, optimizer: str, pruning: str) -> tuple[str, ...]:
    return config.variants if (optimizer, pruning) == ("adamwprune", "state") else ("",)


def combinations(config: Config) -> list[tuple[str, str, str, str, float, int]]:
    """(model, optimizer, variant, pruning, sparsity, seed) for every valid run, in a stable order.

    Rules: pruning "none" runs once, at sparsity 0, whatever the sparsity axis holds;
    state pruning runs only with AdamWPrune, and AdamWPrune only with none or state;
    the bitter variants expand only for AdamWPrune with state pruning.
    """
    result = []
    for model, optimizer, pruning in itertools.product(config.models, config.optimizers, config.prunings):
        if not valid_pair(optimizer, pruning):
            continue
        sparsities = (0.0,) if pruning == "none" else config.sparsities
        for variant, sparsity, seed in itertools.product(_variants(config, optimizer, pruning), sparsities,
                                                         config.seeds):
            result.append((model, optimizer, variant, pruning, sparsity, seed))
    return result


def expand(config: Config, devices: hardware.Devices | None = None) -> list[RunSpec]:
    """One RunSpec per valid combination of the matrix's axes, with its hardware plan (one per model)."""
    devices = devices or hardware.detect()
    plans: dict[str, HardwarePlan] = {}
    specs = []
    for model, optimizer, variant, pruning, sparsity, seed in combinations(config):
        tag = seed if len(config.seeds) > 1 else None
        prune = {**config.prune.__dict__, "method": pruning, "target": sparsity, "variant": variant}
        draft = RunSpec(
            name=run_name(model, optimizer, pruning, sparsity, tag, variant),
            model=model,
            seed=seed,
            optim=config.optim[optimizer],
            prune=PruneSettings(**prune),
            train=config.train,
            hardware=UNPLANNED,
            model_options=dict(config.model_options[model]),
            data_dir=_absolute(config.data_dir),
            tracker=config.tracker,
            tracker_project=config.tracker_project,
            wandb_mode=config.wandb_mode,
        )
        if model not in plans:  # the plan depends on the model, its options and the batch only
            plans[model] = hardware.plan(draft, config.hardware, devices, config.jobs)
        specs.append(dataclasses.replace(draft, hardware=plans[model]))
    return specs


UNPLANNED = HardwarePlan(device="cpu", micro_batch=1, grad_accum=1)


def dry_run_table(specs: list[RunSpec]) -> str:
    """The matrix as a text table, with each run's hardware plan."""
    rows = [("#", "run", "optimizer", "pruning", "sparsity", "seed", "plan")]
    for i, s in enumerate(specs, 1):
        plan = short_plan(s.hardware)
        rows.append((str(i), s.name, s.optimizer, s.pruning, f"{s.sparsity:.0%}", str(s.seed), plan))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short_plan(hw: HardwarePlan) -> str:
    """e.g. "cuda 128x8x1=1024 bf16 compile": micro x accum x ranks = effective batch."""
    extras = [hw.dtype.replace("bfloat", "bf").replace("float", "fp")] + [
        word for word, on in (("compile", hw.compile), ("tf32", hw.tf32), ("probe", hw.probe)) if on]
    return f"{hw.device} {hw.micro_batch}x{hw.grad_accum}x{hw.world_size}={hw.effective_batch} {' '.join(extras)}"


def plan_lines(specs: list[RunSpec]) -> list[str]:
    """Each distinct plan of the matrix with its rationale (one per model)."""
    plans = {s.model: s.hardware for s in specs}
    return [f"plan for {model}: {short_plan(hw)}\n  why: {hw.rationale}" for model, hw in plans.items()]


def create_results_folder(config: Config, specs: list[RunSpec], command: str) -> Path:
    """results/<name>_<YYYYmmdd_HHMMSS>/ with config.txt, matrix.json and one spec.json per run."""
    base = Path(_absolute(config.results_dir))
    prefix = config.results_name or (config.models[0] if len(config.models) == 1 else "matrix")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
        folder = base / f"{prefix}_{stamp}"
        n = 1
        while folder.exists():
            n += 1
            folder = base / f"{prefix}_{stamp}_{n}"
        folder.mkdir()
        overrides = "".join(f"# override: {k}={v}\n" for k, v in config.overrides.items())
        (folder / "config.txt").write_text(config.text + overrides)
        for spec in specs:
            (folder / spec.name).mkdir()
            spec.write(folder / spec.name / "spec.json")
        write_json_atomic(folder / "matrix.json", {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": command,
            "runs": [s.name for s in specs],
        })
    except OSError as exc:
        raise HarnessError(f"cannot write results under {base}: {exc.strerror}; "
                           f"set CONFIG_RESULTS_DIR to a writable folder") from None
    return folder


def run_folder(folder: Path, jobs: int, only_unfinished: bool = False) -> list[dict[str, Any]]:
    """Run the folder's runs (each in its own process, ``jobs`` at a time); write summary and report."""
    matrix = _read_matrix(folder)
    todo = [name for name in matrix["runs"] if not (only_unfinished and _finished(folder / name))]
    print(f"{folder}: {len(todo)} of {len(matrix['runs'])} run(s) to do, {jobs} at a time", flush=True)
    running: list[tuple[str, subprocess.Popen, float]] = []
    bar = tqdm(total=len(todo), unit="run", disable=None, leave=False)
    queue = list(todo)
    node = _node_rank(folder, matrix["runs"])  # several machines: node 0 records, the others only train
    try:
        while queue or running:
            while queue and len(running) < jobs:
                name = queue.pop(0)
                running.append((name, _launch(folder / name), time.time()))
            running = _reap(folder, running, bar, record=node == 0)
            time.sleep(0.05)
    except KeyboardInterrupt:
        for _, proc, _ in running:
            proc.terminate()
        raise HarnessError(f"interrupted; `make continue` finishes {folder}") from None
    finally:
        bar.close()
    if node:
        print(f"node {node}: trained as a worker; node 0 writes the results and the report", flush=True)
        return []
    return write_summary(folder)


def _node_rank(folder: Path, names: list[str]) -> int:
    try:
        return RunSpec.read(folder / names[0] / "spec.json").hardware.node_rank if names else 0
    except HarnessError:
        return 0


def write_summary(folder: Path) -> list[dict[str, Any]]:
    """summary.json (one entry per run, in matrix order), graphs/ and report.md."""
    from lib import plots, report

    matrix = _read_matrix(folder)
    runs = [_read_summary(folder / name) for name in matrix["runs"]]
    write_json_atomic(folder / "summary.json", {"folder": folder.name, "command": matrix["command"],
                                                "created": matrix["created"], "runs": runs})
    plots.write_graphs(folder)
    report.write_report(folder)
    return runs


def newest_unfinished(results_dir: str) -> Path:
    """The newest results folder that has runs without an ok or diverged summary."""
    base = Path(_absolute(results_dir))
    folders = sorted((p.parent for p in base.glob("*/matrix.json")), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in folders:
        names = _read_matrix(folder)["runs"]
        if not all(_finished(folder / n) for n in names):
            return folder
    raise HarnessError(f"no unfinished results folder under {base}; start a new matrix with `make`")


def _launch(run_dir: Path) -> subprocess.Popen:
    """Start one run: lib.run itself, or under torchrun when its plan has several processes."""
    try:
        command = distributed.launch_command(RunSpec.read(run_dir / "spec.json").hardware, run_dir)
    except HarnessError:  # an unreadable spec.json: lib.run says so in the run's log and record
        command = [sys.executable, "-m", "lib.run", str(run_dir)]
    log = (run_dir / "log.txt").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    (run_dir / "summary.json").unlink(missing_ok=True)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _reap(folder: Path, running: list, bar: tqdm, record: bool = True) -> list:
    still = []
    for name, proc, started in running:
        if proc.poll() is None:
            still.append((name, proc, started))
            continue
        if not record:  # a worker node: rank 0, on node 0, writes the run's summary
            bar.update(1)
            tqdm.write(f"{name}: exited with status {proc.returncode} (worker node)")
            continue
        summary = _read_summary(folder / name, exit_code=proc.returncode)
        bar.update(1)
        tqdm.write(f"{_one_line(summary)}  [{time.time() - started:.1f}s]")
    return still


def _read_summary(run_dir: Path, exit_code: int | None = None) -> dict[str, Any]:
    """A run's summary.json; a crashed run that left none gets a failed record with its log's tail."""
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        reason = f"exited with status {exit_code}" if exit_code is not None else "did not finish"
        summary = failed_summary(run_dir.name, f"{reason}: {_failure_line(run_dir / 'log.txt')}")
        if exit_code is not None:
            write_json_atomic(path, summary)
        return summary


def _failure_line(log: Path) -> str:
    """Why a run left no summary: the first rank's own failure line (torchrun's report follows it), else
    the log's last line."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    ranks = [line for line in lines if re.match(RANK_FAILED.format(rank=r"\d+"), line)]
    return (ranks or lines[-1:] or ["no output"])[0]


def _one_line(s: dict[str, Any]) -> str:
    if s["status"] != "ok":
        return f"{s['name']}: {s['status'].upper()}  {s.get('error') or ''}".rstrip()
    metric = s["metric"]["name"]
    best = f"val {metric} {s['best']['val'][metric]:.2f}" if s.get("best") else "no eligible checkpoint"
    test = f"test {s['test_at_best'][metric]:.2f}" if s.get("test_at_best") else ""
    sp = s["sparsity"]
    flags = f"  [{', '.join(s['flags'])}]" if s.get("flags") else ""
    return f"{s['name']}: ok  {best}  {test}  sparsity {sp['reached']:.1%} (target {sp['target']:.0%}){flags}"


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") in FINISHED
    except (OSError, json.JSONDecodeError):
        return False


def _read_matrix(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "matrix.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise HarnessError(f"{folder} is not a results folder made by `make` (no readable matrix.json)") from None


def _absolute(path: str) -> str:
    return str(path if os.path.isabs(path) else ROOT / path)
