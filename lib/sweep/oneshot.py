"""`make sweep RUN=<run dir>` (or RESULTS=<dir>): how much pruning a trained model tolerates.

The run's best checkpoint is read, never written. For every pattern x importance metric x target
sparsity a copy of the dense weights is pruned one-shot, without training, and evaluated on the
validation split; each row also records its size as it would be stored and its speed measured
beside the dense model (lib/sweep/measure.py). The metrics that need data (gradient sensitivity,
activation, Wanda, SparseGPT) see a few calibration batches of training data first, batch norm and
dropout in evaluation mode (lib/sweep/subject.py).

The recommendation, per pattern, is the highest target whose validation metric stays within the
tolerance of dense (points of accuracy, or percent of perplexity). Overall, among the patterns'
picks, one that buys something measured here (fewer parameters, or a reliable speed-up of
MIN_SPEEDUP or more) is preferred, then the highest sparsity reached over all prunable weights
(ties: the better metric); only it is evaluated on the test split (docs/algorithms.md, "One-shot
sweep").
Everything goes to <run dir>/sweep/: sweep.json, sweep.md and sweep.png (lib/sweep/report.py).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from lib import checkpoint
from lib.checkpoint.folder import RunCheckpoints
from lib.config import sweep as sweep_settings
from lib.core.errors import ConfigError, HarnessError, first_line
from lib.core.files import file_sha256
from lib.core.spec import SweepSettings, run_spec
from lib.core.task import Metric, get_task
from lib.optim import build_optimizer
from lib.pruning import sensitivity
from lib.pruning.prunable import zero_fraction
from lib.results import load as load_results
from lib.surgery.measure import LARGE_BATCH
from lib.sweep import layers as layer_sweep
from lib.sweep import measure as sweep_measure
from lib.sweep import report as sweep_report
from lib.sweep.subject import Subject, calibrate, cannot, check_calibration, pruner_for, subject_of


def sweep_run(run_dir: Path, given: dict[str, str | None] | None = None, say: Any = print) -> dict[str, Any]:
    """Sweep the best checkpoint of ``run_dir``; write <run_dir>/sweep/ and return the record."""
    spec = run_spec(run_dir)
    task = get_task(spec.model)
    settings = sweep_settings.overridden(spec.sweep, given or {}, task.metric.higher_is_better)
    checkpoints = RunCheckpoints(run_dir)
    best = checkpoints.require_best("sweep")
    digest = file_sha256(best)
    payload = checkpoint.load(best)
    task.prepare(spec)
    check_calibration(task, spec, settings)
    subject = subject_of(spec, task, settings, payload)
    say(f"sweep: {best} (step {payload['step']}) on {subject.device}: {len(settings.patterns)} pattern(s) x "
        f"{len(settings.metrics)} metric(s) x {len(settings.sparsities)} sparsities, one-shot, on the val split")
    subject.calibrated = {metric: calibrate(subject, metric) for metric in settings.metrics}
    base = zero_fraction(subject.model)
    reference = "dense" if base == 0 else f"the checkpoint as trained ({100 * base:.1f} % sparse)"
    dense = _dense_row(subject)
    rows = [row for pattern in settings.patterns for metric in settings.metrics
            for row in _rows(subject, pattern, metric, base, say)]
    value = dense["val"][task.metric.name]
    layers = layer_sweep.measure(subject, value, say) if settings.layers else {}
    picks = recommend(rows, value, task.metric, settings)
    chosen = overall(rows, picks, task.metric, dense)
    test = _test(subject, rows[chosen]) if chosen is not None else None
    record = {"run": spec.name, "model": spec.model, "checkpoint": {"path": checkpoints.best_in_run, "sha256": digest,
                                                                    "step": int(payload["step"])},
              "metric": dataclasses.asdict(task.metric), "device": str(subject.device),
              "settings": dataclasses.asdict(settings), "reference": reference,
              "tolerance": tolerance_text(task.metric, settings, reference),
              "calibration": {"batches": settings.calibration_batches, "micro_batch": spec.hardware.micro_batch},
              "checkpoint_sparsity": base, "dense": dense, "rows": rows,
              "recommended": {pattern: pick for pattern, pick in picks.items()},
              "overall": None if chosen is None else {"row": chosen, "test": test, "buys": buys(rows[chosen], dense)},
              "note": sweep_measure.CPU_NOTE if subject.device.type == "cpu" else ""}
    if layers:
        record["layers"] = layers
    if file_sha256(best) != digest:
        record["note"] += "; the best checkpoint was replaced while the sweep read it (is the run still training?)"
    out = sweep_report.write(run_dir / "sweep", record)
    say(sweep_report.recommendation_lines(record))
    say(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'} and {out / 'sweep.png'}")
    if layers:
        where = {"path": str(best.resolve()), "sha256": digest, "step": int(payload["step"])}
        content = layer_sweep.record(spec.name, spec.model, where, task.metric, value, list(settings.sparsities),
                                     layers)
        say(f"wrote {sensitivity.write(out, content)} (CONFIG_SPARSITY_DISTRIBUTION_FILE for the sweep distribution)")
    return record


def sweep_results(folder: Path, given: dict[str, str | None] | None = None, say: Any = print) -> list[dict]:
    """Sweep every ok run of a results folder, then draw one combined graph; a run that cannot be swept
    (no best checkpoint, ...) is named and the others go on."""
    runs = [run for run in load_results(folder).runs if run.summary.get("status") == "ok" and run.directory]
    if not runs:
        raise HarnessError(f"{folder}: no ok run to sweep; finish the runs first (`make continue`)")
    records, failed = [], []
    for run in runs:
        try:
            records.append(sweep_run(run.directory, given, say))
        except ConfigError:
            raise  # a bad setting fails every run alike
        except HarnessError as exc:
            failed.append(run.name)
            say(f"sweep: {run.name} skipped: {exc}")
    if records:
        say(f"wrote {sweep_report.write_combined(folder, records)}")
    if failed:
        raise HarnessError(f"sweep: {len(failed)} of {len(runs)} run(s) could not be swept: {', '.join(failed)}")
    return records


# -- the rows ------------------------------------------------------------------------------------


def _rows(subject: Subject, pattern: str, metric: str, base: float, say: Any) -> list[dict[str, Any]]:
    n, m = _nm(pattern) if ":" in pattern else (0, 1)
    targets = [1 - n / m] if ":" in pattern else list(subject.settings.sparsities)
    if cannot(pattern, metric):
        say(f"  {pattern:>12} {metric:<20} skipped ({cannot(pattern, metric)})")
        return [{"pattern": pattern, "metric": metric, "target": t, "skipped": cannot(pattern, metric)}
                for t in targets]
    pruner = pruner_for(subject, pattern, metric)
    rows = []
    try:
        for target in targets:
            row = {"pattern": pattern, "metric": metric, "target": target}
            skip = _skip(pruner, target, base)
            if skip:
                rows.append({**row, "skipped": skip})
                say(f"  {pattern:>12} {metric:<20} {100 * target:5.1f} %: skipped ({skip})")
                continue
            rows.append({**row, **_measure(subject, pattern, pruner, target)})
            say(f"  {pattern:>12} {metric:<20} {100 * target:5.1f} %: " + sweep_report.row_line(subject.task.metric,
                                                                                             rows[-1]))
    finally:
        pruner.close()
        subject.restore()
    return rows


def _skip(pruner: Any, target: float, base: float) -> str:
    if target <= base + 1e-9:
        return f"the checkpoint is already {100 * base:.1f} % sparse"
    reachable = getattr(pruner, "reachable", 1.0)
    if target > reachable:
        return f"beyond the {100 * reachable:.1f} % that whole structures can reach"
    return ""


def _apply(subject: Subject, pruner: Any, target: float) -> None:
    subject.restore()
    pruner.masks = {}
    pruner.prune_to(target)


def _measure(subject: Subject, pattern: str, pruner: Any, target: float) -> dict[str, Any]:
    _apply(subject, pruner, target)
    task, spec = subject.task, subject.spec
    row: dict[str, Any] = {"reached": pruner.sparsity(), "reached_all": zero_fraction(subject.model),
                           "val": task.evaluate(subject.model, spec, "val")}
    coverage = [name for name, _ in pruner.params]
    if pattern == "structured":
        smaller = _cut(subject, pruner).to(subject.device)
        row.update(size=sweep_measure.sizes(smaller, "dense"), speed=sweep_measure.speed(
            task, spec, subject.dense, smaller, subject.device), removed=pruner.report().get("structures"))
        return _with_int8(subject, row, smaller, "dense")
    row["size"] = sweep_measure.sizes(subject.model, pattern, coverage)
    if ":" in pattern:
        row["dense_layers"] = pruner.report()["dense_layers"]
    row["speed"] = sweep_measure.speed(task, spec, subject.dense, subject.model, subject.device)
    if pattern == "2:4" and sweep_measure.semi_structured_ok(subject.device):
        try:
            dense, sparse, converted = sweep_measure.semi_structured_pair(subject.dense, subject.model, coverage)
            row["speed_sparse_kernels"] = {**sweep_measure.speed(task, spec, dense, sparse, subject.device),
                                           "kernels": f"semi-structured sparse, float16, {converted} Linear layer(s)"}
        except RuntimeError as exc:  # recorded, not hidden: the row keeps its dense-kernel timing
            row["speed_sparse_kernels"] = {"error": first_line(exc)}
    return _with_int8(subject, row, subject.model, pattern, coverage)


def _with_int8(subject: Subject, row: dict[str, Any], model: nn.Module, pattern: str,
               coverage: list[str] | None = None) -> dict[str, Any]:
    """``row`` with its int8 measurement (SWEEP_INT8 / QUANT=int8), timed on the CPU beside dense float32."""
    if subject.settings.int8:
        if subject.dense_cpu is None:
            subject.dense_cpu = copy.deepcopy(subject.dense).cpu().eval()
        row["int8"] = sweep_measure.int8_row(subject.task, subject.spec, model, subject.dense_cpu, pattern, coverage)
    return row


def _cut(subject: Subject, pruner: Any) -> nn.Module:
    """The structurally smaller model the masks describe, cut on the CPU by surgery's one path."""
    from lib.surgery.command import Trained, smaller

    cpu = subject.task.build_model(subject.spec, subject.architecture)
    cpu.load_state_dict({k: v.cpu() for k, v in subject.model.state_dict().items()})
    old = Trained(cpu, build_optimizer(cpu, subject.spec.optim), None)
    return smaller(subject.task, subject.spec, old, pruner.removed_units(), pruner.removed_blocks())[1].model


def _dense_row(subject: Subject) -> dict[str, Any]:
    row = {"val": subject.task.evaluate(subject.model, subject.spec, "val"),
           "size": sweep_measure.sizes(subject.model, "dense")}
    return _with_int8(subject, row, subject.model, "dense")


def _test(subject: Subject, row: dict[str, Any]) -> dict[str, float]:
    pruner = pruner_for(subject, row["pattern"], row["metric"])
    try:
        _apply(subject, pruner, row["target"])
        return subject.task.evaluate(subject.model, subject.spec, "test")
    finally:
        pruner.close()
        subject.restore()


# -- the recommendation ---------------------------------------------------------------------------


def within(value: float, dense: float, metric: Metric, settings: SweepSettings) -> bool:
    """True when ``value`` is within the tolerance of the dense ``dense``."""
    if metric.higher_is_better:
        return dense - value <= settings.tolerance_accuracy + 1e-9
    return value <= dense * (1 + settings.tolerance_perplexity / 100) + 1e-9


def recommend(rows: list[dict[str, Any]], dense: float, metric: Metric,
              settings: SweepSettings) -> dict[str, int | None]:
    """{pattern: index of its highest-target row within tolerance (ties: better metric), or None}."""
    picks: dict[str, int | None] = {}
    for i, row in enumerate(rows):
        picks.setdefault(row["pattern"], None)
        if "val" not in row or not within(row["val"][metric.name], dense, metric, settings):
            continue
        j = picks[row["pattern"]]
        if j is None or _ahead(row, rows[j], "target", metric):
            picks[row["pattern"]] = i
    return picks


def overall(rows: list[dict[str, Any]], picks: dict[str, int | None], metric: Metric,
            dense: dict[str, Any] | None = None) -> int | None:
    """Of the patterns' picks (all within tolerance, so their quality ties), one that buys something measured
    here (``buys``) before one that does not; then the highest sparsity over all prunable weights; then the
    better metric."""
    best = None
    for i in picks.values():
        if i is None:
            continue
        gains, leader = bool(buys(rows[i], dense)), best is not None and bool(buys(rows[best], dense))
        if best is None or gains > leader or (gains == leader and _ahead(rows[i], rows[best], "reached_all", metric)):
            best = i
    return best


MIN_SPEEDUP = 1.05  # below this a speed-up is within what repeated timings wander by


def buys(row: dict[str, Any], dense: dict[str, Any] | None) -> list[str]:
    """What a row's model gains over dense, measured here: fewer parameters to hold and run, or a speed-up that
    is reliable (lib/core/timing.py) and at least MIN_SPEEDUP. Zeros stored densely buy neither."""
    gains = []
    size, before = row.get("size") or {}, ((dense or {}).get("size") or {}).get("parameters")
    if before and size.get("parameters") and size["parameters"] < before:
        gains.append(f"parameters {before:,} -> {size['parameters']:,} ({size['parameters'] / before:.2f}x)")
    for name, speed in (("", row.get("speed")), (" on 2:4 sparse kernels", row.get("speed_sparse_kernels"))):
        up = (speed or {}).get(f"speedup_batch_{LARGE_BATCH}")
        if speed and "error" not in speed and speed.get("reliable") and up and up >= MIN_SPEEDUP:
            gains.append(f"throughput {up:.2f}x{name}")
    return gains


def _ahead(a: dict[str, Any], b: dict[str, Any], key: str, metric: Metric) -> bool:
    if a[key] != b[key]:
        return a[key] > b[key]
    return metric.better(a["val"][metric.name], b["val"][metric.name])


def tolerance_text(metric: Metric, settings: SweepSettings, reference: str = "dense") -> str:
    if metric.higher_is_better:
        return f"at most {settings.tolerance_accuracy:g} points of {metric.name} below {reference}"
    return f"{metric.name} at most {settings.tolerance_perplexity:g} % above {reference}"


# -- small helpers --------------------------------------------------------------------------------


def _nm(pattern: str) -> tuple[int, int]:
    n, m = pattern.split(":")
    return int(n), int(m)
