"""``structured`` and ``layer_dropout`` pruning (lib/pruning/structured.py) over the families' own
structure descriptions (lib/core/structures.py): whole units masked, exactly as if removed."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2.model import GPT, config_for
from lenet5.model import LeNet5
from lib.core import structures
from lib.core.errors import ConfigError
from lib.core.spec import PruneSettings
from lib.pruning import build_pruner
from resnet.model import resnet18
from tests.conftest import tiny_spec, trained_run

FAMILIES = {
    "lenet5": (LeNet5, lambda: torch.randn(4, 1, 32, 32)),
    "gpt2": (lambda: GPT(config_for("tiny", vocab_size=256, block_size=32)), lambda: torch.randint(0, 256, (2, 32))),
    "resnet18": (resnet18, lambda: torch.randn(2, 3, 32, 32)),
}


def pruned(family: str, method: str, target: float, importance: str = "magnitude"):
    build, data = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(data()).float().pow(2).mean().backward()
    optimizer.step()  # optimizer state exists, so its masking is tested too
    settings = PruneSettings(method=method, target=target, start=1, end=2, frequency=1, importance=importance)
    pruner = build_pruner(model, optimizer, settings)
    pruner.set_total_steps(10)
    pruner.prune_to(target / 2)
    pruner.prune_to(target)
    return model, optimizer, pruner, data


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_masks_whole_units_and_reaches_the_target(family: str) -> None:
    model, optimizer, pruner, _ = pruned(family, "structured", 0.5)
    assert abs(pruner.sparsity() - 0.5) <= 0.005  # the trainer's tolerance
    masks = {name: pruner.mask(name) for name, _ in pruner.params}
    removed = [u for u in pruner.units if pruner._gone(u, masks)]
    assert removed and pruner.report()["structures"]
    assert sum(v["removed"] for v in pruner.report()["structures"].values()) == len(removed)
    params = dict(model.named_parameters())
    for unit in removed:  # the weights, and every optimizer state tensor shaped like them, are zero
        for part in unit.parts:
            index = torch.tensor(part.index)
            for tensor in (params[part.param], *optimizer.state[params[part.param]].values()):
                if tensor.shape == params[part.param].shape:
                    assert not tensor.index_select(part.dim, index).any()
    for group in {u.group for u in pruner.units}:  # one unit of every layer stays
        assert any(not pruner._gone(u, masks) for u in pruner.units if u.group == group)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_units_contribute_nothing(family: str) -> None:
    """What surgery relies on: whatever a removed unit's producer side holds, the output is unchanged,
    because the consumers' matching columns are zero."""
    model, _, pruner, data = pruned(family, "structured", 0.5)
    model.eval()
    x = data()
    before = model(x)
    masks = {name: pruner.mask(name) for name, _ in pruner.params}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for unit in (u for u in pruner.units if pruner._gone(u, masks)):
            producer = unit.parts[0]
            rows = torch.tensor(producer.index)
            params[producer.param].index_copy_(0, rows, torch.randn_like(params[producer.param][rows]))
    assert torch.allclose(model(x), before, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2"])
def test_a_dropped_block_passes_its_input_through(family: str) -> None:
    model, optimizer, pruner, data = pruned(family, "layer-dropout", 0.5)
    dropped = [b for b, u in zip(pruner.blocks, pruner.units, strict=True)
               if pruner._gone(u, {n: pruner.mask(n) for n, _ in pruner.params})]
    assert len(dropped) == 2 and pruner.report()["structures"]["block"] == {"removed": 2, "total": 4}
    assert all(not p.any() for b in dropped for p in b.module.parameters())  # biases and norms too
    x = data()
    skipped = copy.deepcopy(model)
    kept = [block for block, b in zip(skipped.h, pruner.blocks, strict=True) if b.name not in
            {d.name for d in dropped}]
    skipped.h = nn.ModuleList(kept)
    assert torch.equal(model(x), skipped(x))
    model(x).pow(2).mean().backward()  # training on: the dropped blocks' parameters stay zero
    pruner.before_step()
    optimizer.step()
    assert all(not p.any() for b in dropped for p in b.module.parameters())


def test_bad_inputs_are_one_line() -> None:
    with torch.device("meta"):
        lenet, resnet = LeNet5(), resnet18()
    with pytest.raises(ConfigError,
                       match="layer-dropout pruning needs residual blocks that can be dropped; LeNet5 has none"):
        build_pruner(lenet, None, PruneSettings(method="layer-dropout", target=0.5, start=1, end=2, frequency=1))
    with pytest.raises(ConfigError, match=r"can remove at most 14\.5 % of ResNet's prunable weights .*not 50 %"):
        build_pruner(resnet, None, PruneSettings(method="layer-dropout", target=0.5, start=1, end=2,
                                                 frequency=1)).check_target(0.5)
    with pytest.raises(ConfigError, match="describes none"):
        build_pruner(nn.Sequential(nn.Linear(4, 4)), None,
                     PruneSettings(method="structured", target=0.5, start=1, end=2, frequency=1))


def test_the_families_describe_their_structures() -> None:
    gpt = GPT(config_for("tiny", vocab_size=256, block_size=32))
    kinds = [s.kind for s in structures.structures(gpt)]
    assert kinds.count("head") == 4 * 4 and kinds.count("neuron") == 4 * 512
    head = structures.structures(gpt)[1]  # block 0, head 1: its q, k and v rows and its output columns
    assert head.parts[0].index[:2] == (32, 33) and head.parts[0].index[32] == 128 + 32
    assert head.parts[1].param == "h.0.attn.c_proj.weight" and head.parts[1].index == tuple(range(32, 64))
    assert [b.name for b in structures.residual_blocks(resnet18())] == ["layer1.0", "layer1.1", "layer2.1",
                                                                        "layer3.1", "layer4.1"]
    assert len(structures.structures(LeNet5())) == 6 + 16 + 120 + 84


def test_a_structured_lenet_run_reaches_its_target_and_resumes_its_masks(tmp_path: Path) -> None:
    spec = tiny_spec("structured", pruning="structured", sparsity=0.7, max_iters=20)
    run_dir = trained_run(tmp_path, spec)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and not summary["flags"], summary
    assert abs(summary["sparsity"]["reached"] - 0.7) <= 0.005
    assert summary["sparsity"]["structures"]["unit"]["removed"] > 0
    # masks and the metric's state go through a checkpoint and back
    model, optimizer, pruner, _ = pruned("lenet5", "structured", 0.5)
    again = build_pruner(copy.deepcopy(model), None, dataclasses.replace(pruner.settings))
    again.load_state_dict(pruner.state_dict())
    assert all(torch.equal(again.mask(n), pruner.mask(n)) for n, _ in pruner.params)


def test_the_matrix_refuses_a_target_the_method_cannot_reach(make_config) -> None:
    from lib import config, matrix
    from lib.hardware import Devices

    text = ("CONFIG_MODEL_GPT2=y\nCONFIG_GPT2_SIZE_TINY=y\nCONFIG_PRUNING_STRUCTURED=y\n"
            "CONFIG_TARGET_SPARSITY=\"0.95\"\n")
    with pytest.raises(ConfigError, match=r"^structured pruning can remove at most 91\.5 % of GPT's prunable "
                                          r"weights \(one unit of every layer stays.*not 95 %; lower the sparsity"):
        matrix.expand(config.load(make_config(text)), Devices("cpu", cpu_cores=2))
    specs = matrix.expand(config.load(make_config("CONFIG_MODEL_GPT2=y\nCONFIG_GPT2_SIZE_TINY=y\n"
                                                  "CONFIG_PRUNING_LAYER_DROPOUT=y\n")), Devices("cpu", cpu_cores=2))
    assert [s.prune.method for s in specs] == ["layer-dropout"] and specs[0].prune.importance == "magnitude"


def test_the_report_lists_the_units_removed() -> None:
    from lib.results import Run
    from lib.results.report import _structures

    counts = {"channel": {"removed": 3, "total": 22}, "unit": {"removed": 75, "total": 204}}
    lines = _structures([Run({"name": "a", "sparsity": {"structures": counts}}), Run({"name": "b", "sparsity": {}})])
    assert "| a | channel: 3 of 22 masked, unit: 75 of 204 masked |" in lines
    assert not any("| b |" in line for line in lines)
    assert _structures([Run({"name": "b"})]) == []
