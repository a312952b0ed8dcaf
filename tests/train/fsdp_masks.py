"""Run by tests/train/test_fsdp.py under torchrun (2 ranks, gloo): the exact threshold's masks over FSDP2 shards,
gathered, against one process's masks on the whole tensors, for |w| and for AdamWPrune's state (bitter7); rank 0
writes the comparison as JSON to argv[2]."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from gpt2.model import GPT, config_for
from lib.core.spec import OptimSettings, PruneSettings
from lib.optim import build_optimizer
from lib.pruning.magnitude import MagnitudePruner
from lib.pruning.state import StatePruner
from lib.pruning.threshold import exact_value
from lib.train import sharding

SPARSITIES = (0.3, 0.5, 0.9)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = GPT(config_for("tiny", 64, 16, None))
    with torch.no_grad():
        for param in model.parameters():  # a grid of 1/64: thousands of equal |w|, also at every cut
            param.copy_((param * 64).round() / 64)
    whole = copy.deepcopy(model)
    sharding.shard(model, list(model.h), "float32")
    settings = PruneSettings(method="magnitude", target=0.9)
    ours, reference = MagnitudePruner(model, None, settings), MagnitudePruner(whole, None, settings)
    assert ours.sharded and not reference.sharded
    equal, ties = [], 0
    for sparsity in SPARSITIES:
        if sparsity == 0.5:
            cut = exact_value(reference._lazy_scores(), sparsity)
            ties = sum(int((s == cut).sum()) for s in reference._lazy_scores())
        ours.prune_to(sparsity)
        reference.prune_to(sparsity)
        same = True
        for name, param in ours.params:
            gathered = DTensor.from_local(ours.mask(name), param.device_mesh, param.placements, shape=param.shape,
                                          stride=param.stride()).full_tensor()
            same &= bool(torch.equal(gathered, reference.mask(name)))
        equal.append(same)
    state_equal = state_pruning_alike(whole, model)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"sparsities": list(SPARSITIES), "equal": equal, "ties_at_cut": ties,
                                   "state_equal": state_equal}))
    dist.destroy_process_group()


def gathered(pruner: StatePruner | MagnitudePruner, name: str, param: torch.Tensor) -> torch.Tensor:
    return DTensor.from_local(pruner.mask(name), param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def state_pruning_alike(whole: torch.nn.Module, model: torch.nn.Module) -> list[bool]:
    """AdamWPrune + bitter7 on shards and whole, after two steps on equal gradients: masks, then masked weights."""
    optimizers = [build_optimizer(m, OptimSettings("adamwprune", 1e-2, 0.0, base="adamw")) for m in (whole, model)]
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        for (_, p), (_, q) in zip(whole.named_parameters(), model.named_parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = distribute_tensor(p.grad, q.device_mesh, q.placements)
        for optimizer in optimizers:
            optimizer.step()
    settings = PruneSettings(method="state", variant="bitter7", target=0.7)
    reference, ours = (StatePruner(m, o, settings) for m, o in zip((whole, model), optimizers, strict=True))
    reference.prune_to(0.7)
    ours.prune_to(0.7)
    weights = dict(whole.named_parameters())
    return [all(torch.equal(gathered(ours, n, p), reference.mask(n)) for n, p in ours.params),
            all(torch.equal(p.full_tensor(), weights[n]) for n, p in ours.params)]


if __name__ == "__main__":
    main(Path(sys.argv[2]))
