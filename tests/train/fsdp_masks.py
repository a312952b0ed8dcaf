"""Run by tests/train/test_fsdp.py under torchrun (2 ranks, gloo): the exact threshold's masks over FSDP2 shards,
gathered, against one process's masks on the whole tensors; rank 0 writes the comparison as JSON to argv[2]."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gpt2.model import GPT, config_for
from lib.core.spec import PruneSettings
from lib.pruning.magnitude import MagnitudePruner
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
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"sparsities": list(SPARSITIES), "equal": equal, "ties_at_cut": ties}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[2]))
