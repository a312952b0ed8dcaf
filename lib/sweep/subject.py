"""The checkpoint a sweep studies, and the pruner each of its rows uses (lib/sweep/oneshot.py).

A row is a pattern (unstructured, N:M, structured) and a metric: an importance metric of
lib/pruning/importance.py, ranked by the pattern's pruner, or ``sparsegpt``, which also rewrites the kept
weights (lib/pruning/sparsegpt.py) and makes no structures. The metrics that need data (gradient sensitivity,
activation, Wanda, SparseGPT) see the same first CALIBRATION training micro-batches: one forward and backward
each for the importance metrics, forwards only for SparseGPT.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import PruneSettings, RunSpec, SweepSettings
from lib.core.task import Task, first_batches
from lib.pruning import build_pruner, sparsegpt
from lib.pruning.importance import build_importance, observing
from lib.pruning.prunable import prunable_parameters

NEEDS_CALIBRATION = ("gradient-sensitivity", "activation", "wanda", sparsegpt.NAME)


@dataclasses.dataclass
class Subject:
    """The checkpoint under study: the model (pruned in place row by row), its dense weights, a dense twin."""

    spec: RunSpec
    task: Task
    settings: SweepSettings
    model: nn.Module
    dense: nn.Module
    weights: dict[str, torch.Tensor]
    architecture: dict | None
    device: torch.device
    calibrated: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    dense_cpu: nn.Module | None = None  # the int8 rows' timing reference (int8 runs on the CPU)

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)

    def batches(self) -> list[tuple[torch.Tensor, ...]]:
        """The calibration micro-batches, on the sweep's device (the same ones for every metric)."""
        return first_batches(self.task, self.spec, self.settings.calibration_batches, self.device)


def subject_of(spec: RunSpec, task: Task, settings: SweepSettings, payload: dict[str, Any]) -> Subject:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    architecture = payload.get("architecture")
    model = task.build_model(spec, architecture)
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Subject(spec, task, settings, model, copy.deepcopy(model), weights, architecture, device)


def check_calibration(task: Task, spec: RunSpec, settings: SweepSettings) -> None:
    """One line when a metric needs calibration data that CALIBRATION does not give."""
    needing = [m for m in settings.metrics if m in NEEDS_CALIBRATION]
    if not needing:
        return
    if settings.calibration_batches == 0:
        raise ConfigError(f"sweep: {', '.join(needing)} need calibration batches, and CALIBRATION is 0; "
                          f"give CALIBRATION=8 (or METRICS=magnitude)")
    wanted = settings.calibration_batches * spec.hardware.micro_batch
    have = task.examples_per_epoch(spec)
    if wanted > have:
        raise ConfigError(f"sweep: {settings.calibration_batches} calibration batches x micro-batch "
                          f"{spec.hardware.micro_batch} = {wanted} examples, but {spec.model}'s training split holds "
                          f"{have}; give CALIBRATION={max(1, have // spec.hardware.micro_batch)} or fewer")


def calibrate(subject: Subject, metric: str) -> dict[str, Any]:
    """The state of importance ``metric`` after the calibration batches ({} for magnitude, which needs none,
    and for SparseGPT, which reads the batches layer by layer as it prunes)."""
    if metric not in NEEDS_CALIBRATION or metric == sparsegpt.NAME:
        return {}
    model, task, params = subject.model, subject.task, prunable_parameters(subject.model)
    importance = build_importance(metric, model, params)
    try:
        with observing(model, params):  # the sweep's model is in eval mode, and stays so
            for batch in subject.batches():
                model.zero_grad(set_to_none=True)
                task.loss(model, batch).backward()
                importance.accumulate()
        return importance.state_dict()
    finally:
        model.zero_grad(set_to_none=True)
        importance.close()


def cannot(pattern: str, metric: str) -> str:
    """Why ``metric`` makes no ``pattern`` row ('' when it does)."""
    if metric == sparsegpt.NAME and pattern == "structured":
        return "SparseGPT removes single weights or N:M groups, not structures"
    return ""


def pruner_for(subject: Subject, pattern: str, metric: str) -> Any:
    """The pruner of one (pattern, metric) pair, its metric's calibration loaded."""
    nm = tuple(int(x) for x in pattern.split(":")) if ":" in pattern else None
    if metric == sparsegpt.NAME:
        model, task = subject.model, subject.task
        return sparsegpt.SparseGPT(model, subject.batches(), lambda batch: task.loss(model, batch), nm)
    method = "nm" if nm else {"unstructured": "magnitude", "structured": "structured"}[pattern]
    n, m = nm or (2, 4)
    pruner = build_pruner(subject.model, None, PruneSettings(method=method, importance=metric, nm_n=n, nm_m=m))
    names = {name for name, _ in pruner.params}
    state = {key: {name: v for name, v in part.items() if name in names}
             for key, part in subject.calibrated[metric].items()}
    pruner.metric.load_state_dict(state)
    return pruner
