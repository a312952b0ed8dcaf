"""The best checkpoint: which evaluations may be "best" (selected on validation only, at the target sparsity),
writing it as whole tensors, and the one test-split evaluation on it at the end of a run."""

from __future__ import annotations

from typing import Any

import torch

from lib.checkpoint import state as ckpt_state
from lib.checkpoint.folder import RunCheckpoints
from lib.core.spec import RunSpec
from lib.core.task import Task
from lib.train import distributed, sharding
from lib.train.distributed import Shard
from lib.train.record import SPARSITY_TOLERANCE, Best


def save_best(checkpoints: RunCheckpoints, model: torch.nn.Module, pruner: Any, step: int, shard: Shard) -> None:
    """The best checkpoint as whole tensors, written by rank 0 (a sharded model is gathered first, by every rank)."""
    state = sharding.full_state(model, pruner) if pruner.sharded else None
    if shard.main:
        weights, masks = (state["model"], state["pruner"]) if state else (model.state_dict(), pruner.state_dict())
        checkpoints.save_best({"model": weights, "pruner": masks, "step": step,
                               "architecture": ckpt_state.architecture_of(model)})


def eligible(record: dict[str, Any], spec: RunSpec) -> bool:
    """Only checkpoints at the target sparsity, with the target's masks, may be "best": an early dense one says
    nothing of pruning, and an N:M one before its last update is not N:M."""
    return spec.pruning == "none" or (record["sparsity"] >= spec.sparsity - SPARSITY_TOLERANCE
                                      and record.get("masks_final", True))


def improves(task: Task, record: dict[str, Any], best: Best) -> bool:
    value = record["val"][task.metric.name]
    return not best.step or task.metric.better(value, best.metrics[task.metric.name])


def test_at_best(task: Task, model: torch.nn.Module, spec: RunSpec, checkpoints: RunCheckpoints, best: Best,
                  shard: Shard) -> dict | None:
    """Evaluate the test split once, on the best checkpoint as saved on disk (read by rank 0, sent to all)."""
    if not best.step:
        return None
    step, state = best.step, None
    if shard.main:
        state = checkpoints.load_best()
        step = state["step"]
    if sharding.is_sharded(model):
        sharding.load_full(model, state["model"] if state else None)
    else:
        if state:
            model.load_state_dict(state["model"])
        distributed.broadcast_module(model)
    model.eval()
    with torch.no_grad(), sharding.whole(model):
        result = task.evaluate(model, spec, "test", shard=shard)
    return {"step": step, **result}
