"""Distillation from a dense teacher while pruning (CONFIG_DISTILL; Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network").

The loss of every training step becomes ``(1 - a) * CE(student, targets) + a * T^2 * KL(p_teacher || p_student)``
with ``p = softmax(logits / T)``, ``a`` = DISTILL_WEIGHT and ``T`` = DISTILL_TEMPERATURE; T^2 keeps the KL
term's gradients on the scale of the cross-entropy's. The teacher is a run's best checkpoint: the same seed's
dense run of the same matrix (the matrix trains it first; a student that starts earlier waits for it), or a
named run folder. It is loaded once, in eval mode with no gradients, and must be the same model with the same
number of classes (tokens); anything else is one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib import checkpoint
from lib.checkpoint.folder import RunCheckpoints
from lib.core.errors import HarnessError
from lib.core.spec import RunSpec, run_spec
from lib.core.task import Task
from lib.results import run_record

WAIT_LOG_S = 60.0  # a student waiting for its teacher says so this often


@dataclass
class Teacher:
    model: nn.Module
    weight: float
    temperature: float
    run_dir: Path
    step: int


def teacher_dir(spec: RunSpec, run_dir: Path) -> Path:
    """The teacher's run folder: a name is a run of the same results folder, a path is itself."""
    named = spec.train.distill_teacher
    return Path(named) if "/" in named else Path(run_dir).parent / named


def teacher_for(task: Task, spec: RunSpec, run_dir: Path, student: nn.Module, device: torch.device,
                say: Callable[[str], Any]) -> Teacher | None:
    """The checked teacher of ``spec`` (None without CONFIG_DISTILL)."""
    if not spec.train.distill_weight:
        return None
    teacher = load_teacher(task, spec, run_dir, device, say)
    check_outputs(task, spec, student, teacher, device)
    say(f"distillation: teacher {teacher.run_dir} (best checkpoint of step {teacher.step}), weight "
        f"{teacher.weight:g}, temperature {teacher.temperature:g}")
    return teacher


def load_teacher(task: Task, spec: RunSpec, run_dir: Path, device: torch.device, say: Callable[[str], Any],
                 poll_s: float = 2.0) -> Teacher:
    """The teacher of ``spec``, waiting for a teacher of the same matrix to end."""
    folder = teacher_dir(spec, run_dir)
    _wait(folder, say, poll_s)
    theirs = run_spec(folder)
    if theirs.model != spec.model:
        raise HarnessError(f"distillation teacher {folder} trained {theirs.model}, this run trains {spec.model}; "
                           f"give a teacher of the same model (CONFIG_DISTILL_TEACHER_PATH)")
    payload = checkpoint.load(RunCheckpoints(folder).require_best("distil from"))
    model = task.build_model(theirs, payload.get("architecture"))
    model.load_state_dict(payload["model"])
    model.to(device).eval().requires_grad_(False)
    return Teacher(model, spec.train.distill_weight, spec.train.distill_temperature, folder, int(payload["step"]))


def check_outputs(task: Task, spec: RunSpec, student: nn.Module, teacher: Teacher, device: torch.device) -> None:
    """One line when the teacher scores another number of classes (a vocabulary of another size)."""
    batch = task.example_batch(spec, 1, device)
    with torch.no_grad():
        ours, theirs = task.logits(student, batch)[0].shape[-1], task.logits(teacher.model, batch)[0].shape[-1]
    if ours != theirs:
        raise HarnessError(f"distillation teacher {teacher.run_dir} scores {theirs} classes (its vocabulary), this "
                           f"model {ours}; give a teacher trained with the same vocabulary and classes")


def objective(task: Task, teacher: Teacher | None) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The training loss: the task's own, or the distillation loss (module docstring) with ``teacher``."""
    if teacher is None:
        return task.loss

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        scores, targets = task.logits(model, batch)
        with torch.no_grad():
            guide, _ = task.logits(teacher.model, batch)
        return blended(scores, guide, targets, teacher.weight, teacher.temperature)

    return loss


def blended(scores: torch.Tensor, guide: torch.Tensor, targets: torch.Tensor, weight: float,
            temperature: float) -> torch.Tensor:
    """``(1 - weight) * CE + weight * T^2 * KL(softmax(guide / T) || softmax(scores / T))``, KL averaged over rows."""
    t = temperature
    kl = F.kl_div(F.log_softmax(scores.float() / t, dim=-1), F.log_softmax(guide.float() / t, dim=-1),
                  log_target=True, reduction="batchmean")
    return (1 - weight) * F.cross_entropy(scores, targets) + weight * t * t * kl


def _wait(folder: Path, say: Callable[[str], Any], poll_s: float) -> None:
    """Until the teacher's run has ended ok; one line if it failed or is not a run."""
    waited, last = 0.0, 0.0
    while True:
        found = run_record(folder)  # the one check of a run's summary.json (lib/results)
        status = found.record["status"] if found.record else None
        if status == "ok":
            return
        if status is not None or not found.missing:
            how = f"ended {status}" if status else f"left an unusable summary.json ({found.problem})"
            raise HarnessError(f"distillation teacher {folder} {how}, so this run has no teacher; fix and finish "
                               f"it first (make continue)")
        if not (folder / "spec.json").is_file():
            raise HarnessError(f"distillation teacher {folder} is not a run folder (no spec.json); give a run "
                               f"folder with a best checkpoint (CONFIG_DISTILL_TEACHER_PATH)")
        if waited - last >= WAIT_LOG_S or waited == 0.0:
            say(f"distillation: waiting for the teacher {folder.name} to finish ({waited:.0f} s so far)")
            last = waited
        time.sleep(poll_s)
        waited += poll_s
