"""A finished training session as its summary record (what lib/train/run.py writes as summary.json,
checked against lib/results/schema.py wherever it is read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lib.checkpoint.state import Progress
from lib.core.spec import HardwarePlan, RunSpec
from lib.core.task import Task
from lib.hardware import gpus, memory, plan_actckpt
from lib.optim import compact
from lib.train import distributed
from lib.train.distributed import Shard

SPARSITY_TOLERANCE = 0.005  # reached sparsity must be within 0.5 points of target


@dataclass
class Best:
    """The best evaluation so far among those eligible (at target sparsity)."""

    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Ended:
    """How the loop ended: its outcome and counters (this rank's samples and time; ``summary`` reduces them)."""

    status: str
    error: str | None
    best: Best
    test: dict[str, Any] | None  # the test split at the best checkpoint, when the run ended ok
    reached: float  # sparsity of the final weights
    planned: int
    step: int
    evaluations: int
    samples: int
    train_time: float
    wall: float


@dataclass
class Trained:
    """What was trained: the model, its optimizer and pruner, structure statistics, on which device and plan."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pruner: Any
    stats: Any
    device: torch.device
    hw: HardwarePlan


def summary(spec: RunSpec, task: Task, trained: Trained, ended: Ended, done: Progress, probe_tries: list[dict],
            activations: int | None, shard: Shard) -> dict[str, Any]:
    """The run's record; with several ranks a collective call (every rank's masks and counters)."""
    model, optimizer, pruner, stats, device, hw = (trained.model, trained.optimizer, trained.pruner, trained.stats,
                                                   trained.device, trained.hw)
    flags = []
    if spec.pruning != "none" and abs(ended.reached - spec.sparsity) > SPARSITY_TOLERANCE:
        flags.append("sparsity_missed")
    if ended.status == "ok" and ended.best.step == 0:
        flags.append("no_eligible_checkpoint")
    ranks = _ranks_record(pruner, flags) if shard.world_size > 1 else {}
    samples = distributed.reduce_sum(ended.samples)[0]  # every rank's samples, the slowest rank's time
    train_time = distributed.reduce_max(ended.train_time)
    throughput = samples / train_time if train_time else 0.0
    best = ended.best
    return {
        "name": spec.name,
        "status": ended.status,
        "error": ended.error,
        "flags": flags,
        "metric": {"name": task.metric.name, "higher_is_better": task.metric.higher_is_better,
                   "unit": task.metric.unit},
        "best": {"step": best.step, "val": best.metrics} if best.step else None,
        "test_at_best": ended.test,
        "sparsity": {"target": spec.sparsity, "reached": ended.reached, "prunable_params": pruner.prunable_count(),
                     "cut_by_surgery": pruner.removed / max(1, pruner.prunable_count() + pruner.removed),
                     "total_params": sum(p.numel() for p in model.parameters()), **pruner.report(),
                     **pruner.layer_report()},
        "steps": {"planned": ended.planned, "done": ended.step, "evaluations": ended.evaluations},
        "memory": {**memory.peak(device), "state_bytes": memory.state_bytes(
            model, optimizer, pruner.buffer_bytes() + compact.buffer_bytes(optimizer))},
        "throughput": {"unit": f"{task.sample_unit}/s", "value": throughput},
        "mfu": _mfu(task, spec, hw, device, throughput),
        "activations": plan_actckpt.record(task, spec, hw, activations),
        "hardware": {"micro_batch": hw.micro_batch, "grad_accum": hw.grad_accum, "world_size": hw.world_size,
                     "planned_micro_batch": spec.hardware.micro_batch, "probe": probe_tries},
        "wall_time_s": ended.wall,
        **({"resumed": {"count": len(done.resumed_from), "from_steps": done.resumed_from}}
           if done.resumed_from else {}),
        **({"surgery": done.surgeries} if done.surgeries else {}),
        **({"structure_stats": {"every": stats.every, "count": stats.count}} if stats else {}),
        **({"distill": {"teacher": spec.train.distill_teacher, "weight": spec.train.distill_weight,
                        "temperature": spec.train.distill_temperature}} if spec.train.distill_weight else {}),
        **ranks,
    }


def _mfu(task: Task, spec: RunSpec, hw: HardwarePlan, device: torch.device, throughput: float) -> dict | None:
    """Model FLOPs utilisation on a known GPU in 16-bit (lib/hardware/gpus.py); None on the CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    return gpus.mfu(task.flops_per_sample(spec), throughput, torch.cuda.get_device_name(device), total, hw.dtype,
                    hw.world_size)


def _ranks_record(pruner: Any, flags: list[str]) -> dict[str, Any]:
    """Every rank's mask digest, and whether they agree (flag "masks_differ" if not); a collective call."""
    digests = distributed.gather(distributed.mask_digest(pruner))
    if pruner.sharded:  # each rank holds its shard of every mask: the digests differ by design
        return {"distributed": {"world_size": len(digests), "backend": distributed.backend(), "parallel": "fsdp",
                                "mask_shard_digests": digests}}
    identical = len(set(digests)) == 1
    if not identical:
        flags.append("masks_differ")
    return {"distributed": {"world_size": len(digests), "backend": distributed.backend(), "mask_digests": digests,
                            "masks_identical": identical}}
