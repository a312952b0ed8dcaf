"""The plan's choice of how several ranks share the model: DDP (replicated) or FSDP2 (sharded).

``auto`` keeps DDP while the replicated estimate fits the GPU and shards (FSDP2, one unit per
block, lib/train/sharding.py) when it does not and the sharded one does; the rationale gives the
per-rank estimate both ways. A model or setting that cannot shard is refused in one line, with
the reason, when FSDP2 is asked for or needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lib.core.errors import ConfigError
from lib.core.spec import RunSpec
from lib.core.units import gib
from lib.hardware import memory
from lib.hardware.batch import DoesNotFit

T = TypeVar("T")

# What runs on shards today (lib/train/sharding.py); everything else is refused with its reason.
SHARDED_PRUNING = ("none", "magnitude", "state")
SHARDED_OPTIMIZERS = ("sgd", "adam", "adamw", "adamwprune")
RANKS_TRIED = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # the fewest GPUs a model would fit on, sharded


def cannot_shard(spec: RunSpec, task: Any) -> str:
    """Why ``spec`` cannot train under FSDP2 here; "" when it can."""
    import torch

    with torch.device("meta"):
        blocks = task.blocks(task.build_model(spec))
    if not blocks:
        return f"{spec.model} has no blocks to shard one at a time (FSDP2 shards per block)"
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in blocks[0].modules()):
        return (f"{spec.model}'s BatchNorm running statistics are updated per rank and are not yet kept alike "
                f"across shards")
    if spec.prune.method not in SHARDED_PRUNING:
        return (f"pruning method {spec.prune.method!r} does not run on sharded weights yet (FSDP2 runs: "
                f"{', '.join(SHARDED_PRUNING)})")
    if spec.prune.method != "none" and spec.prune.distribution != "global":
        return f"the {spec.prune.distribution} sparsity distribution does not run on sharded weights yet"
    if spec.prune.method != "none" and spec.prune.threshold != "exact":
        return f"the {spec.prune.threshold} threshold does not run on sharded weights yet (FSDP2 runs exact)"
    if spec.prune.method == "magnitude" and spec.prune.importance != "magnitude":
        return f"importance {spec.prune.importance!r} does not run on sharded weights yet (FSDP2 runs |w|)"
    if spec.optim.name not in SHARDED_OPTIMIZERS or (spec.optim.name == "adamwprune" and spec.optim.base != "adamw"):
        return (f"optimizer {spec.optim.name!r}{' (base ' + spec.optim.base + ')' if spec.optim.base else ''} does "
                f"not run on sharded weights yet (FSDP2 runs: {', '.join(SHARDED_OPTIMIZERS)}, AdamWPrune on AdamW)")
    for what, on in (("compact optimizer state (CONFIG_COMPACT_STATE)", spec.optim.compact_state),
                     ("surgery during training (CONFIG_SURGERY_EVERY)", spec.train.surgery_every),
                     ("distillation (CONFIG_DISTILL: the teacher is not sharded yet)", spec.train.distill_weight),
                     ("structure statistics (CONFIG_STRUCTURE_STATS_EVERY)", spec.train.structure_stats_every),
                     ("quantization-aware training (CONFIG_QUANT_AWARE)", spec.train.quant_aware)):
        if on:
            return f"{what} does not run on sharded weights yet"
    return ""


def choose(asked: str, spec: RunSpec, task: Any, world: int, on_gpu: bool, dtype: str,
           size: Callable[[int], T]) -> tuple[str, T, str]:
    """(``"ddp"`` or ``"fsdp"``, ``size(shards)``'s plan, the rationale's words). ``size`` plans the batch with the
    state sharded over ``shards`` ranks and raises DoesNotFit when micro-batch 1 does not fit."""
    if asked == "fsdp":
        if world < 2:
            raise ConfigError("CONFIG_PARALLEL_FSDP shards the model over ranks, but this run has 1 rank; raise "
                              "CONFIG_RANKS_PER_NODE (or use more GPUs), or choose PARALLEL_AUTO")
        _refuse_unshardable(spec, task, "CONFIG_PARALLEL_FSDP")
        return "fsdp", size(world), f"PARALLEL_FSDP: {_both(task, spec, dtype, world)}"
    try:
        planned = size(1)
    except DoesNotFit as exc:
        if asked == "ddp" or not on_gpu or world < 2:
            hint = _sharded_hint(task, spec, dtype, world, asked, exc.usable)
            raise DoesNotFit(f"{exc}; {hint}", exc.usable) from None
        reason = cannot_shard(spec, task)
        if reason:
            raise DoesNotFit(f"{exc}; sharding it (FSDP2) is not possible: {reason}", exc.usable) from None
        try:
            planned = size(world)
        except DoesNotFit:
            hint = _sharded_hint(task, spec, dtype, world, asked, exc.usable)
            raise DoesNotFit(f"{exc}; even {hint}", exc.usable) from None
        return "fsdp", planned, (f"auto: the replicated estimate does not fit, the sharded one does; "
                                 f"{_both(task, spec, dtype, world)}")
    if world < 2:
        return "ddp", planned, ""
    why = "PARALLEL_DDP" if asked == "ddp" else "auto: the replicated estimate fits" if on_gpu else "auto: CPU"
    return "ddp", planned, why


def _refuse_unshardable(spec: RunSpec, task: Any, symbol: str) -> None:
    reason = cannot_shard(spec, task)
    if reason:
        raise ConfigError(f"{symbol}: {spec.name} cannot shard: {reason}; choose PARALLEL_DDP or change that setting")


def per_rank(task: Any, spec: RunSpec, dtype: str, shards: int) -> int:
    """The per-rank estimate at micro-batch 1 without activation checkpointing, sharded over ``shards``."""
    return memory.estimate_footprint(task, spec, dtype, (), shards).at(1)


def _both(task: Any, spec: RunSpec, dtype: str, world: int) -> str:
    return (f"per rank at micro-batch 1 about {gib(per_rank(task, spec, dtype, world))} sharded over {world} ranks, "
            f"{gib(per_rank(task, spec, dtype, 1))} replicated")


def _sharded_hint(task: Any, spec: RunSpec, dtype: str, world: int, asked: str, usable: int) -> str:
    """The sharded figure over this run's ranks, and the fewest GPUs of this kind it would fit on sharded."""
    shards = max(2, world)
    words = (f"sharded over {shards} ranks (FSDP2) about {gib(per_rank(task, spec, dtype, shards))} per rank at "
             f"micro-batch 1")
    if asked == "ddp" and world > 1:
        return words + "; choose PARALLEL_AUTO or PARALLEL_FSDP to shard it"
    enough = next((n for n in RANKS_TRIED if n > world and per_rank(task, spec, dtype, n) <= usable), 0)
    if enough:
        return words + f"; sharded it fits on {enough} GPUs of this kind (CONFIG_RANKS_PER_NODE, DIST_MULTINODE)"
    return words + f"; it fits on no number of these GPUs up to {RANKS_TRIED[-1]}"
