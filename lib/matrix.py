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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lib import distributed, hardware, runlock
from lib.config import Config
from lib.errors import HarnessError
from lib.files import DiskFullError, free_space, is_disk_full, write_error, write_json_atomic
from lib.kconf import ROOT
from lib.results import read_json, record_problem, results_folders, unreadable_record
from lib.run import DISK_FULL_EXIT, RANK_FAILED, STOPPED_EXIT, failed_summary
from lib.spec import HardwarePlan, PruneSettings, RunSpec
from lib.task import get_task

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

    Rules: pruning "none" runs once, at sparsity 0, and "nm" once, at its pattern's 1 - N/M,
    whatever the sparsity axis holds;
    state pruning runs only with AdamWPrune, and AdamWPrune only with none or state;
    the bitter variants expand only for AdamWPrune with state pruning.
    """
    result = []
    for model, optimizer, pruning in itertools.product(config.models, config.optimizers, config.prunings):
        if not valid_pair(optimizer, pruning):
            continue
        sparsities = {"none": (0.0,), "nm": (1 - config.prune.nm_n / config.prune.nm_m,)}.get(
            pruning, config.sparsities)
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
            surgery=config.surgery,
            sweep=config.sweep,
        )
        if model not in plans:  # the plan depends on the model, its options and the batch only
            plans[model] = hardware.plan(draft, config.hardware, devices, config.jobs)
        if pruning in BY_MODEL:  # a target or pattern the model cannot hold fails before any run
            _check_units(draft)
        specs.append(dataclasses.replace(draft, hardware=plans[model]))
    return specs


UNPLANNED = HardwarePlan(device="cpu", micro_batch=1, grad_accum=1)
WHOLE_UNITS = ("structured", "layer-dropout")  # methods whose reach depends on the model's structures
BY_MODEL = (*WHOLE_UNITS, "nm")  # ... and N:M, which needs a layer whose input dimension M divides


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
    if spec.prune.method in WHOLE_UNITS:
        _UNIT_PRUNERS[key].check_target(spec.prune.target)


_UNIT_PRUNERS: dict[tuple[str, str, str, int, int], Any] = {}


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


def run_folder(folder: Path, jobs: int, only_unfinished: bool = False) -> list[dict[str, Any]]:
    """Run the folder's runs (each in its own process, ``jobs`` at a time); write summary and report.

    Refuses a folder another live trainer is working in. A full disk, Ctrl-C or SIGTERM stops every run
    (none is recorded as failed for it) and `make continue` finishes the folder later.
    """
    matrix = _read_matrix(folder)
    for name in matrix["runs"]:  # one driver per folder: another `make` may still be training in it
        runlock.check_free(folder / name)
    todo = [name for name in matrix["runs"] if not (only_unfinished and _finished(folder / name))]
    for name in todo:  # before launching anything: a damaged folder stops here, nothing half-started
        if not (folder / name / "spec.json").is_file():
            raise HarnessError(f"{folder / name}/spec.json is missing, so that run cannot be (re)started; restore "
                               f"it, or start the experiment again with `make`")
    print(f"{folder}: {len(todo)} of {len(matrix['runs'])} run(s) to do, {jobs} at a time", flush=True)
    running: list[tuple[str, subprocess.Popen, float]] = []
    bar = tqdm(total=len(todo), unit="run", disable=None, leave=False)
    queue = list(todo)
    node = _node_rank(folder, matrix["runs"])  # several machines: node 0 records, the others only train
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                name = queue.pop(0)
                running.append((name, _launch(folder / name), time.time()))
            running = _reap(folder, running, bar, record=node == 0)
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(running)
        raise HarnessError(f"interrupted; `make continue` finishes {folder}") from None
    except DiskFullError:
        _stop(running)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    if node:
        print(f"node {node}: trained as a worker; node 0 writes the results and the report", flush=True)
        return []
    return write_summary(folder)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the runs as Ctrl-C does


def _stop(running: list[tuple[str, subprocess.Popen, float]]) -> None:
    """Terminate the running runs and wait for them; they are left unfinished for `make continue`."""
    for _, proc, _ in running:
        proc.terminate()
    for _, proc, _ in running:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _node_rank(folder: Path, names: list[str]) -> int:
    try:
        return RunSpec.read(folder / names[0] / "spec.json").hardware.node_rank if names else 0
    except HarnessError:
        return 0


def write_summary(folder: Path) -> list[dict[str, Any]]:
    """summary.json (one entry per run, in matrix order), graphs/ and report.md."""
    from lib import plots, report

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
    data, why = read_json(run_dir / "summary.json")
    problem = why if data is None else record_problem(data)
    if problem is None:
        return data
    had_result = bool(last) and last.get("status") in (*FINISHED, "unreadable")
    if why == "missing" and not had_result:
        return _read_summary(run_dir)  # never finished: a failed record with its log's last line
    return unreadable_record(run_dir.name, "is missing" if why == "missing" else problem, last)


def newest_unfinished(results_dir: str) -> Path:
    """The newest results folder (by creation stamp) that has runs without an ok or diverged summary."""
    base = Path(_absolute(results_dir))
    for folder in reversed(results_folders(base)):
        names = _read_matrix(folder)["runs"]
        if not all(_finished(folder / n) for n in names):
            return folder
    raise HarnessError(f"no unfinished results folder under {base}; start a new matrix with `make`")


def _launch(run_dir: Path) -> subprocess.Popen:
    """Start one run: lib.run itself, or under torchrun when its plan has several processes.

    The run folder's lock is taken here and handed to the child, which holds it until it exits; the child
    gets SIGTERM if this driver dies, so no trainer outlives the matrix that started it.
    """
    try:
        command = distributed.launch_command(RunSpec.read(run_dir / "spec.json").hardware, run_dir)
    except HarnessError:  # an unreadable spec.json: lib.run says so in the run's log and record
        command = [sys.executable, "-m", "lib.run", str(run_dir)]
    lock = runlock.lock(run_dir)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", runlock.FD_ENV: str(lock)}
        (run_dir / "summary.json").unlink(missing_ok=True)
        driver = os.getpid()
        with (run_dir / "log.txt").open("a") as log:  # a resumed run adds to its earlier log
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, pass_fds=(lock,),
                                    preexec_fn=lambda: runlock.die_with_parent(driver))
        runlock.record_holder(lock, proc.pid)
    except OSError as exc:
        raise write_error(run_dir / "log.txt", exc) from None
    finally:
        os.close(lock)  # the child's copy keeps the lock until the child exits
    return proc


def _reap(folder: Path, running: list, bar: tqdm, record: bool = True) -> list:
    """The runs still running; each finished one is recorded and printed. DiskFullError stops the matrix."""
    still = []
    for name, proc, started in running:
        if proc.poll() is None:
            still.append((name, proc, started))
            continue
        bar.update(1)
        if proc.returncode == DISK_FULL_EXIT:
            others = [entry for entry in running if entry[1] is not proc and entry[1].poll() is None]
            _stop(others)
            raise DiskFullError(_disk_full_line(folder / name))
        if proc.returncode == STOPPED_EXIT:  # checkpointed on SIGTERM/SIGUSR1: unfinished, not failed
            tqdm.write(f"{name}: stopped after a checkpoint; `make continue` resumes it")
            continue
        if not record:  # a worker node: rank 0, on node 0, writes the run's summary
            tqdm.write(f"{name}: exited with status {proc.returncode} (worker node)")
            continue
        summary = _read_summary(folder / name, exit_code=proc.returncode)
        tqdm.write(f"{_one_line(summary)}  [{time.time() - started:.1f} s from launch to exit]")
    return still


def _disk_full_line(run_dir: Path) -> str:
    """The run's own disk-full line from its log, else one made here."""
    own = re.search(r"disk full .*? to finish", _failure_line(run_dir / "log.txt"))
    if own:
        return own.group(0)
    return (f"disk full while {run_dir.name} ran ({free_space(run_dir)} free in {run_dir.parent}); "
            f"free some space, then run `make continue` to finish")


def _read_summary(run_dir: Path, exit_code: int | None = None) -> dict[str, Any]:
    """A run's summary.json; a crashed run that left none gets a failed record with its log's tail."""
    path = run_dir / "summary.json"
    data, _ = read_json(path)
    if record_problem(data) is None:
        return data
    reason = f"exited with status {exit_code}" if exit_code is not None else "did not finish"
    summary = failed_summary(run_dir.name, f"{reason}: {_failure_line(run_dir / 'log.txt')}")
    if exit_code is not None:
        write_json_atomic(path, summary)  # DiskFullError on a full disk: the matrix stops
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
    data, _ = read_json(run_dir / "summary.json")
    return record_problem(data) is None and data.get("status") in FINISHED


def _read_matrix(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "matrix.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise HarnessError(f"{folder} is not a results folder made by `make` (no readable matrix.json)") from None


def _absolute(path: str) -> str:
    return str(path if os.path.isabs(path) else ROOT / path)
