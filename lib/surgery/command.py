"""`make surgery RUN=<run dir> [FRACTION=0.3] [STRUCTURE=heads|neurons|channels|units|blocks]`.
(docs/algorithms.md, "Structure statistics and surgery")

Measure twice, cut once: load the run's newest training checkpoint (or, for a finished
run, its newest milestone), choose what to remove (from the structure statistics the
run gathered, or exactly what a structured or layer-dropout run already masked), build
the smaller model (lib/surgery/cut.py), carry the optimizer and pruner state across,
evaluate both on the validation split, and then either

- accept: keep the original in checkpoints/before_surgery/, write the smaller
  checkpoint atomically as the run's newest training checkpoint, and set the run
  unfinished (summary.json becomes summary.before_surgery.json) so that `make continue`
  trains on from it; or
- roll back: when the validation loss rises by more than CONFIG_SURGERY_MAX_LOSS_INCREASE,
  touch no checkpoint, say by how much it rose, and exit non-zero.

Either way run_dir/surgery.json gains a record with what was measured before and after
(lib/surgery/measure.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.checkpoint import state as ckpt_state
from lib.checkpoint.folder import RunCheckpoints
from lib.config import surgery_structure
from lib.core import runlock
from lib.core.errors import HarnessError, number
from lib.core.files import write_json_atomic
from lib.core.spec import RunSpec, run_spec
from lib.core.structures import KINDS, Structure
from lib.core.task import Task, get_task
from lib.optim import build_optimizer, compact
from lib.pruning import WHOLE_STRUCTURES, build_pruner
from lib.results import read_json
from lib.surgery import cut as surgery
from lib.surgery import dependency
from lib.surgery import measure as surgery_measure
from lib.surgery.stats import StructureStats


@dataclasses.dataclass
class Trained:
    """A model with its optimizer and pruner, as a checkpoint holds them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    pruner: Any

    @classmethod
    def build(cls, task: Task, spec: RunSpec, architecture: dict | None) -> Trained:
        model = task.build_model(spec, architecture)
        optimizer = build_optimizer(model, spec.optim)
        return cls(model, optimizer, build_pruner(model, optimizer, spec.prune))

    def load(self, payload: dict[str, Any]) -> Trained:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.pruner.load_state_dict(payload["pruner"])
        # Cuts select values along weight axes, so compact moments (lib/optim/compact.py) are expanded first; the
        # resumed run compacts the smaller model's again.
        names = {param: name for name, param in self.pruner.params}
        compact.restore_(self.optimizer, self.pruner.packed_masks(), names, wanted=False)
        return self


def operate(run_dir: Path, fraction: str | None = None, structure: str | None = None,
            say: Any = print, locked: bool = False) -> dict[str, Any]:
    """Cut the run in ``run_dir`` and return the surgery record; HarnessError (one line) when it is refused
    or rolled back, the checkpoints untouched. ``locked``: the caller is the run's own trainer process."""
    spec = run_spec(run_dir)
    if locked:
        return _operate(run_dir, spec, fraction, structure, say)
    held = runlock.lock(run_dir)  # no trainer may write this folder's checkpoints meanwhile
    try:
        return _operate(run_dir, spec, fraction, structure, say)
    finally:
        os.close(held)


def _operate(run_dir: Path, spec: RunSpec, fraction: str | None, structure: str | None,
             say: Any) -> dict[str, Any]:
    path, payload = RunCheckpoints(run_dir).newest_to_cut()
    _same_run(payload, spec, path)
    task = get_task(spec.model)
    old = Trained.build(task, spec, payload.get("architecture")).load(payload)
    step = int(payload["step"])
    _schedule_done(old.pruner, spec, payload)
    removed, blocks, source = choose(old, payload, spec, _fraction(fraction), structure)
    cut, new = smaller(task, spec, old, removed, blocks)
    cut_weights = old.pruner.prunable_count() - new.pruner.prunable_count()
    new.pruner.load_state_dict(surgery.carry_pruner(payload["pruner"], old.model, cut, cut_weights))
    progress = dict(payload["progress"])
    cut_payload = {**payload, "model": new.model.state_dict(), "optimizer": new.optimizer.state_dict(),
               "pruner": new.pruner.state_dict(), "architecture": cut.architecture,
               "statistics": None}  # statistics describe the old shapes: gathering starts again
    say(f"surgery: {path.relative_to(run_dir)} (step {step}): removing {_removed_line({'removed': cut.counts()})} "
        f"chosen from {source}; evaluating both models on the validation split and measuring them (CPU)")
    task.prepare(spec)
    before = task.evaluate(old.model, spec, "val")
    after = task.evaluate(new.model, spec, "val")
    rise, limit = after["loss"] - before["loss"], spec.surgery.max_loss_increase
    record = {"step": step, "checkpoint": str(path.relative_to(run_dir)), "source": source,
              "removed": cut.counts(), "removed_blocks": blocks, "prunable_weights_removed": cut_weights,
              "architecture": {"before": payload.get("architecture"), "after": cut.architecture},
              "val_loss": {"before": before["loss"], "after": after["loss"], "rise": rise, "limit": limit},
              "accepted": rise <= limit, "measured_at": {"micro_batch": surgery_measure.profile_batch(spec),
                                                         "large_batch": surgery_measure.LARGE_BATCH},
              "measured": surgery_measure.before_after(task, spec, (old, payload), (new, cut_payload))}
    _append_record(run_dir, record)
    if rise > limit:
        raise HarnessError(f"surgery rolled back: validation loss rose {rise:.4f} ({before['loss']:.4f} -> "
                           f"{after['loss']:.4f}), more than CONFIG_SURGERY_MAX_LOSS_INCREASE={limit:g}; "
                           f"{path} is untouched (remove less: a smaller FRACTION)")
    progress["surgeries"] = [*progress.get("surgeries", []), {k: record[k] for k in (
        "step", "source", "removed", "removed_blocks", "prunable_weights_removed", "val_loss")}]
    progress["best_step"], progress["best_metrics"] = 0, {}  # "best" is chosen again, among the cut model's
    cut_payload["progress"] = progress
    written = _write(run_dir, path, step, cut_payload)
    say(surgery_measure.table(record))
    say(f"surgery accepted: {_removed_line(record)}; val loss {before['loss']:.4f} -> {after['loss']:.4f}; "
        f"wrote {written} (original kept in checkpoints/before_surgery/); `make continue` trains on from it")
    return record


def smaller(task: Task, spec: RunSpec, old: Trained, removed: list[Structure],
            blocks: list[str]) -> tuple[surgery.Cut, Trained]:
    """The Cut that removes ``removed`` and ``blocks`` from ``old``, and the smaller model with its optimizer
    state carried across (its pruner is fresh: the caller carries the pruner's state)."""
    follow = None if getattr(old.model, "surgery_by_hand", False) else dependency.followers(
        old.model, task.example_batch(spec, 1, torch.device("cpu"))[0])  # batch norms, consumers: torch-pruning
    try:
        cut = surgery.plan(old.model, removed, blocks, follow)
    except TypeError as exc:
        raise HarnessError(f"surgery: {exc}") from None
    new = Trained.build(task, spec, cut.architecture)
    new.model.load_state_dict(surgery.carry_model(old.model.state_dict(), cut))
    new.optimizer.load_state_dict(surgery.carry_optimizer(old.optimizer.state_dict(), old.model, old.optimizer,
                                                          new.model, new.optimizer, cut))
    return cut, new


def choose(old: Trained, payload: dict[str, Any], spec: RunSpec, fraction: float | None,
           structure: str | None) -> tuple[list[Structure], list[str], str]:
    """(structures, blocks, where the choice came from): a structured run's own masks, else the
    lowest-scoring share of each layer under the structure statistics."""
    if spec.prune.method in WHOLE_STRUCTURES:  # its masks already removed whole structures
        if fraction is not None or structure is not None:
            raise HarnessError(f"surgery: the masks of this {spec.prune.method} run decide what goes; "
                               f"drop FRACTION= and STRUCTURE=")
        removed, blocks = old.pruner.removed_units(), old.pruner.removed_blocks()
        if not removed and not blocks:
            raise HarnessError(f"surgery: the masks of this {spec.prune.method} run remove no whole structure yet "
                               f"(step {payload['step']}); cut a later checkpoint")
        return removed, blocks, "masks"
    stats_state = payload.get("statistics")
    if not stats_state or not stats_state.get("count"):
        raise HarnessError("surgery: the checkpoint has no structure statistics and no structured masks; train with "
                           "CONFIG_STRUCTURE_STATS_EVERY=N (or the structured or layer-dropout method) first")
    stats = StructureStats(old.model, int(stats_state["every"]))
    stats.load_state_dict(stats_state)
    fraction = spec.surgery.fraction if fraction is None else fraction
    structure = surgery_structure(spec.surgery.structure if structure is None else structure)
    if structure == "blocks":
        return [], _lowest_blocks(stats, fraction, type(old.model).__name__), "statistics"
    return lowest_units(stats, fraction, structure, type(old.model).__name__), [], "statistics"


def lowest_units(stats: StructureStats, fraction: float, structure: str, model: str) -> list[Structure]:
    """In every layer, round(fraction x its structures) of the wanted kinds, lowest score first."""
    has = sorted({unit.kind for unit in stats.units})
    wanted = has if structure == "all" else [KINDS[structure]]
    if not set(wanted) <= set(has):
        plural = ", ".join(f"{k}s" for k in has) or "no structures"
        raise HarnessError(f"surgery: {model} has no {structure}; it has {plural} (and blocks where it has "
                           f"residual blocks): choose STRUCTURE= among them")
    groups: dict[str, list[tuple[float, int, Structure]]] = {}
    for order, unit in enumerate(stats.units):
        if unit.kind in wanted:
            groups.setdefault(unit.group, []).append((stats.score(unit), order, unit))
    removed = []
    for group, members in groups.items():
        count = round(fraction * len(members))
        if count >= len(members):
            raise HarnessError(f"surgery: FRACTION={fraction:g} would remove all {len(members)} "
                               f"{members[0][2].kind}s of {group}; one must stay: use at most "
                               f"{(len(members) - 0.5) / len(members) - 0.005:.2f}")
        removed += [unit for _, _, unit in sorted(members, key=lambda m: m[:2])[:count]]
    if not removed:
        raise HarnessError(f"surgery: FRACTION={fraction:g} rounds to no whole structure in any layer; raise it")
    return removed


def _lowest_blocks(stats: StructureStats, fraction: float, model: str) -> list[str]:
    names = [block.name for block in stats.blocks]
    if not names:
        raise HarnessError(f"surgery: {model} has no residual blocks to remove; choose STRUCTURE=channels or units")
    count = round(fraction * len(names))
    if count >= len(names):
        raise HarnessError(f"surgery: FRACTION={fraction:g} would remove all {len(names)} blocks; one must stay")
    if count == 0:
        raise HarnessError(f"surgery: FRACTION={fraction:g} of {len(names)} blocks rounds to none; raise it")
    ranked = sorted(range(len(names)), key=lambda i: (stats.block_score(names[i]), i))
    return sorted((names[i] for i in ranked[:count]), key=names.index)


def _fraction(text: str | None) -> float | None:
    if text is None:
        return None
    value = number(text, f"FRACTION={text!r} is not a number; give e.g. FRACTION=0.3")
    if not 0.0 < value < 1.0:
        raise HarnessError(f"FRACTION={text} is outside (0, 1); give e.g. FRACTION=0.3")
    return value


def _same_run(payload: dict[str, Any], spec: RunSpec, path: Path) -> None:
    saved = payload.get("spec") or {}
    if saved.get("model") != spec.model:
        raise HarnessError(f"surgery: checkpoint {path} is of model {saved.get('model')!r}, but the run trains "
                           f"{spec.model!r}; it belongs to another run")
    ckpt_state.check_spec(saved, spec.to_dict(), path)


def _schedule_done(pruner: Any, spec: RunSpec, payload: dict[str, Any]) -> None:
    """Pruning on a schedule must be over: its later updates would prune the smaller model again."""
    if spec.prune.method == "none":
        return
    pruner.set_total_steps(int(payload["progress"]["provisional"]))
    step = int(payload["step"])
    if pruner.scheduled_sparsity(step) < spec.prune.target - 1e-9:
        raise HarnessError(f"surgery: at step {step} the {spec.prune.method} schedule has not reached its target "
                           f"{spec.prune.target:g} yet; cut a checkpoint after the schedule ends")


def _append_record(run_dir: Path, record: dict[str, Any]) -> None:
    data, _ = read_json(run_dir / "surgery.json")
    records = data if isinstance(data, list) else []
    write_json_atomic(run_dir / "surgery.json", [*records, record])


def _write(run_dir: Path, source: Path, step: int, payload: dict[str, Any]) -> Path:
    """The smaller checkpoint as the run's newest training checkpoint (the originals kept aside); a finished
    run's summary moves aside too: now it has steps to train again, from the smaller checkpoint."""
    target = RunCheckpoints(run_dir).replace_after_surgery(step, source, payload)
    summary = run_dir / "summary.json"
    if summary.exists():
        os.replace(summary, run_dir / "summary.before_surgery.json")
    return target


def _removed_line(record: dict[str, Any]) -> str:
    return ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in record["removed"].items())
