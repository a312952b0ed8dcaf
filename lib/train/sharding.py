"""FSDP2: one run's model sharded over its ranks (HardwarePlan.parallel == "fsdp", issue 30).

``shard`` applies torch's ``fully_shard`` to each block (Task.blocks) and then to the whole model: every
parameter becomes a DTensor holding 1/world of its rows on each rank; a block's whole weights are gathered
just before it runs and freed after, its gradient reduce-scattered. The optimizer and the pruner are built
on the sharded model, so their state and masks are shards too (lib/pruning/sharded.py).

What a replicated run does with whole tensors, a sharded one does here, on every rank together:
- evaluation (``whole``): every unit's weights gathered once, so ranks may run different numbers of
  forwards (the evaluation chunks are dealt round-robin);
- training checkpoints (``save``, ``load``): ``torch.distributed.checkpoint``, each rank writing its shards
  of the weights, optimizer state and masks into a folder beside the rank-0 checkpoint file that holds
  everything else (lib/checkpoint/manager.py names both);
- the best checkpoint (``full_state``, ``load_full``): gathered into one ordinary whole-model file, so
  `make export`, sweeps and surgery read it as they read any other.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.checkpoint.format import CheckpointError
from lib.checkpoint.manager import shards_of
from lib.core.errors import first_line
from lib.optim import bitmask
from lib.pruning.sharded import local


def shard(model: nn.Module, blocks: list[nn.Module], dtype: str) -> None:
    """Shard ``model`` in place, one FSDP2 unit per block and one for the rest; 16-bit gathers in a 16-bit plan
    (gradients reduced in float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy() if dtype == "float32" else MixedPrecisionPolicy(
        param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def whole(model: nn.Module) -> Iterator[None]:
    """Every unit's weights gathered for the block (evaluation): forwards then need no collective."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            if unit is not model:  # the root unit never reshards after forward; the blocks do
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def set_gradient_sync(model: nn.Module, on: bool) -> None:
    """Reduce-scatter the gradients after this backward (``on``) or keep accumulating them unsharded."""
    model.set_requires_gradient_sync(on)


# -- checkpoints --------------------------------------------------------------------------------


def _mask_dtensors(pruner: Any, fill: bool) -> dict[str, Any]:
    """The pruner's masks as bool DTensors sharded like their weights (``fill``: zeros to load into)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in pruner.params:
        mask = pruner.masks.get(name)
        if mask is None and not fill:
            continue
        shape = local(param).shape
        value = torch.zeros(shape, dtype=torch.bool) if fill else (
            mask if mask.dtype == torch.bool else bitmask.unpack(mask, shape))
        out[name] = DTensor.from_local(value.to(local(param).device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride())
    return out


def _state(model: nn.Module, optimizer: Any, masks: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
            "masks": masks}


def save(ckpt: Path, model: nn.Module, optimizer: Any, pruner: Any) -> None:
    """Every rank writes its shards into ``shards_of(ckpt)`` (a collective call); complete when it returns."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = shards_of(ckpt)
    partial = folder.with_name(f".{folder.name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    dcp.save(_state(model, optimizer, _mask_dtensors(pruner, fill=False)), checkpoint_id=partial)
    dist.barrier()
    if dist.get_rank() == 0:  # whole before it takes the name the rank-0 file will point to
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    dist.barrier()


def load(ckpt: Path, model: nn.Module, optimizer: Any, pruner: Any, mask_names: list[str], world: int,
         saved_world: int) -> None:
    """Put the shards of ``shards_of(ckpt)`` into this rank's model, optimizer and pruner (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if saved_world != world:
        raise CheckpointError(f"checkpoint {ckpt} holds shards of {saved_world} ranks (FSDP2), this run has {world}; "
                              f"resume it on {saved_world} ranks (CONFIG_RANKS_PER_NODE, DIST_NNODES), or start over")
    folder = shards_of(ckpt)
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no shards ({folder}/.metadata is missing); move the "
                              f"checkpoints folder away to restart the run from step 0")
    masks = {name: value for name, value in _mask_dtensors(pruner, fill=True).items() if name in mask_names}
    state = _state(model, optimizer, masks)
    try:
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    except Exception as exc:  # dcp wraps every rank's failure in its own exception types
        raise CheckpointError(f"checkpoint {folder} does not fit this run: {first_line(exc)}") from None
    shapes = {name: local(param).shape for name, param in pruner.params}
    pruner.masks = {name: pruner._stored(value.to_local(), shapes[name]) for name, value in state["masks"].items()}


# -- the best checkpoint: whole tensors ---------------------------------------------------------


def full_state(model: nn.Module, pruner: Any) -> dict[str, Any]:
    """The whole model's weights and the pruner's whole masks on rank 0 ({} elsewhere); a collective call."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    masks = {name: value.full_tensor().cpu() for name, value in _mask_dtensors(pruner, fill=False).items()}
    if dist.get_rank() != 0:
        return {}
    state = pruner.state_dict()
    state["masks"] = {name: pruner._stored(mask, mask.shape) for name, mask in masks.items()}
    return {"model": weights, "pruner": state}


def load_full(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's whole-model ``weights`` into every rank's shards (the others pass None); a collective call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights or {}, options=StateDictOptions(full_state_dict=True,
                                                                        broadcast_from_rank0=True))
