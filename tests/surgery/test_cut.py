"""Checkpoint-time surgery on models: lib/surgery/cut.py and lib/surgery/dependency.py.
(issue 14; docs/algorithms.md, "Structure statistics and surgery")

The smaller model must compute what the masked model computes, carry every surviving weight's
optimizer and pruner state bit for bit, and take the same next step.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from gpt2.model import GPT, config_for
from lenet5.model import LeNet5
from lib.core.spec import OptimSettings, PruneSettings
from lib.core.structures import residual_blocks, structures
from lib.optim import build_optimizer
from lib.pruning import build_pruner
from lib.surgery import cut as surgery
from lib.surgery import dependency
from resnet.model import resnet18

FAMILIES = {
    "gpt2": (lambda a=None: GPT(config_for("tiny", vocab_size=256, block_size=16, architecture=a)),
             lambda n: torch.randint(0, 256, (n, 16)), True),
    "resnet": (lambda a=None: resnet18(10, a), lambda n: torch.randn(n, 3, 32, 32), True),
    "lenet5": (lambda a=None: LeNet5(10, widths=a), lambda n: torch.randn(n, 1, 32, 32), False),
}


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.float().pow(2).mean() if out.dim() == 3 else out.logsumexp(-1).mean()


def _masked_trained(family: str, optimizer: str = "adamw"):
    """A model of ``family`` with a third of each layer's structures (and one block) masked to zero,
    trained 3 steps with those weights' gradients masked, so that the optimizer state is not zero."""
    build, inputs, drop_block = FAMILIES[family]
    torch.manual_seed(0)
    random.seed(0)
    model = build()
    for module in model.modules():  # batch norms that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    groups: dict[str, list] = {}
    for unit in structures(model):
        groups.setdefault(unit.group, []).append(unit)
    removed = [u for g in groups.values() for u in random.sample(g, len(g) // 3)]
    blocks = [residual_blocks(model)[0].name] if drop_block else []
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    for unit in removed:
        for part in unit.parts:
            masks[part.param].index_fill_(part.dim, torch.tensor(part.index), False)
    for block in blocks:
        for name in masks:
            if name.startswith(block + "."):
                masks[name].zero_()
    # eps 1e-4: a key bias has an exactly zero gradient in theory and rounding noise (1e-10) in practice,
    # which Adam at eps 1e-8 scales up to a full lr-sized step of random sign; the two models' noise differs
    settings = OptimSettings(optimizer, 1e-2, 0.1, eps=1e-4)
    opt = build_optimizer(model, settings)
    step = _masked_stepper(model, opt, masks)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(masks[name])
    for _ in range(3):
        step(inputs(4))
    return model, opt, settings, removed, blocks, masks, inputs


def _masked_stepper(model, opt, masks):
    def step(x):
        model.train()
        opt.zero_grad()
        _loss(model, x).backward()
        for name, p in model.named_parameters():
            p.grad.mul_(masks[name])
        opt.step()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.mul_(masks[name])  # weight decay of zeros stays zero; this only makes it explicit
    return step


def _cut(model, removed, blocks, inputs, build):
    follow = None if getattr(model, "surgery_by_hand", False) else dependency.followers(model, inputs(1))
    cut = surgery.plan(model, removed, blocks, follow)
    small = build(cut.architecture)
    small.load_state_dict(surgery.carry_model(model.state_dict(), cut))
    return cut, small


def _survivors(old: torch.Tensor, name: str, removed, new_shape) -> torch.Tensor:
    """The entries of ``old`` that survive, selected with boolean masks (independently of index_select)."""
    keep = [torch.ones(n, dtype=torch.bool) for n in old.shape]
    for unit in removed:
        for part in unit.parts:
            if part.param == name:
                keep[part.dim][list(part.index)] = False
    out = old
    for dim, k in enumerate(keep):
        out = out[(slice(None),) * dim + (k,)]
    return out.reshape(new_shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_smaller_model_computes_what_the_masked_one_does(family: str) -> None:
    model, _, _, removed, blocks, _, inputs = _masked_trained(family)
    cut, small = _cut(model, removed, blocks, inputs, FAMILIES[family][0])
    x = inputs(3)
    model.eval()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    assert cut.counts()["block" if blocks else next(iter(cut.counts()))] >= 1


@pytest.mark.parametrize("family,optimizer", [("gpt2", "adamw"), ("resnet", "sgd"), ("lenet5", "adamwspam"),
                                              ("gpt2", "adamwprune")])
def test_optimizer_state_is_carried_bit_for_bit_and_the_next_step_agrees(family: str, optimizer: str) -> None:
    model, opt, settings, removed, blocks, masks, inputs = _masked_trained(family, optimizer)
    build = FAMILIES[family][0]
    cut, small = _cut(model, removed, blocks, inputs, build)
    small_opt = build_optimizer(small, settings)
    small_opt.load_state_dict(surgery.carry_optimizer(opt.state_dict(), model, opt, small, small_opt, cut))
    old_params = dict(model.named_parameters())
    ids = {name: torch.arange(t.numel()).view(t.shape) for name, t in model.state_dict().items()}
    where = surgery.carry_model(ids, cut)  # the old position of every surviving entry
    carried = 0
    for new_name, p in small.named_parameters():
        old_name = cut.keep[new_name][0]
        if any(part.param == old_name for unit in removed for part in unit.parts):  # chosen independently
            assert torch.equal(where[new_name], _survivors(ids[old_name], old_name, removed, p.shape))
        old_state, new_state = opt.state[old_params[old_name]], small_opt.state[p]
        assert set(new_state) == set(old_state)
        for key, value in old_state.items():
            if isinstance(value, torch.Tensor) and value.shape == old_params[old_name].shape:
                expected = value.flatten()[where[new_name].flatten()].view(p.shape)
                assert torch.equal(new_state[key], expected), (new_name, key)  # bit for bit
                carried += 1
            elif isinstance(value, torch.Tensor):
                assert torch.equal(new_state[key], value)
    assert carried >= len(list(small.parameters()))
    x = inputs(4)
    _masked_stepper(model, opt, masks)(x)
    small_masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in small.named_parameters()}
    _masked_stepper(small, small_opt, small_masks)(x)
    for new_name, p in small.named_parameters():
        old = old_params[cut.keep[new_name][0]].detach()
        expected = old.flatten()[where[new_name].flatten()].view(p.shape)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=new_name)


def test_pruner_state_is_cut_and_counts_the_removed_weights() -> None:
    model = GPT(config_for("tiny", vocab_size=256, block_size=16))
    settings = PruneSettings(method="movement", target=0.5, start=1, end=2, frequency=1)
    opt = build_optimizer(model, OptimSettings("adamw", 1e-3, 0.0))
    pruner = build_pruner(model, opt, settings)
    pruner.set_total_steps(4)
    for step in (1, 2):
        _loss(model, torch.randint(0, 256, (2, 16))).backward()
        pruner.before_step()
        opt.step()
        opt.zero_grad()
        pruner.after_step(step)
    heads = [u for u in structures(model) if u.kind == "head"][:2]
    cut = surgery.plan(model, heads, [])
    small = GPT(config_for("tiny", 256, 16, cut.architecture))
    state = pruner.state_dict()
    carried = surgery.carry_pruner(state, model, cut, removed_weights=123)
    assert carried["removed"] == 123
    name = "h.0.attn.c_proj.weight"
    assert carried["movement_scores"][name].shape == small.get_submodule("h.0.attn.c_proj").weight.shape
    assert torch.equal(carried["movement_scores"][name], state["movement_scores"][name][:, 64:])
    small_pruner = build_pruner(small, build_optimizer(small, OptimSettings("adamw", 1e-3, 0.0)), settings)
    small_pruner.load_state_dict(carried)
    assert torch.equal(small_pruner.mask(name), pruner.mask(name)[:, 64:])


def test_layer_dropout_masks_cut_into_fewer_blocks() -> None:
    torch.manual_seed(0)
    model = GPT(config_for("tiny", vocab_size=256, block_size=16))
    pruner = build_pruner(model, None, PruneSettings(method="layer-dropout", target=0.5, start=1, end=2, frequency=1))
    pruner.prune_to(0.5)
    blocks = pruner.removed_blocks()
    assert len(blocks) == 2 and pruner.removed_units() == []
    cut = surgery.plan(model, [], blocks)
    assert cut.architecture == {"n_layer": 2, "heads": [4, 4], "mlp": [512, 512]}
    small = GPT(config_for("tiny", 256, 16, cut.architecture))
    small.load_state_dict(surgery.carry_model(model.state_dict(), cut))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_resnet_streams_couple_every_writer_and_reader_and_keep_the_shortcut_kind() -> None:
    from resnet.model import resnet50

    model = resnet18()
    stem = next(u for u in structures(model) if u.group == "conv1")
    assert {(p.param, p.dim) for p in stem.parts} == {
        ("conv1.weight", 0), ("layer1.0.conv2.weight", 0), ("layer1.1.conv2.weight", 0),
        ("layer1.0.conv1.weight", 1), ("layer1.1.conv1.weight", 1), ("layer2.0.conv1.weight", 1),
        ("layer2.0.shortcut.0.weight", 1)}
    assert model.architecture()["streams"] == [64, 128, 256, 512]
    wide = resnet50(100)
    arch = wide.architecture()
    arch["streams"] = [64, 64, 512, 1024, 2048]  # layer1's stream narrowed to the stem's width by chance
    narrow = resnet50(100, arch)
    assert not isinstance(narrow.layer1[0].shortcut, nn.Identity)  # still a projection, as published
    assert narrow(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_adamwprune_state_pruning_masks_are_cut_once_through_the_pruner() -> None:
    from lib.optim import bitmask

    torch.manual_seed(0)
    model = GPT(config_for("tiny", vocab_size=256, block_size=16))
    settings = OptimSettings("adamwprune", 1e-3, 0.0)
    opt = build_optimizer(model, settings)
    pruner = build_pruner(model, opt, PruneSettings(method="state", target=0.5, start=1, end=2, frequency=1))
    pruner.set_total_steps(3)
    for step in (1, 2, 3):
        _loss(model, torch.randint(0, 256, (2, 16))).backward()
        pruner.before_step()
        opt.step()
        opt.zero_grad()
        pruner.after_step(step)
    assert opt.masks
    heads = [u for u in structures(model) if u.kind == "head" and u.group == "h.2.attn"][:1]
    cut = surgery.plan(model, heads, [])
    small = GPT(config_for("tiny", 256, 16, cut.architecture))
    small.load_state_dict(surgery.carry_model(model.state_dict(), cut))
    small_opt = build_optimizer(small, settings)
    small_opt.load_state_dict(surgery.carry_optimizer(opt.state_dict(), model, opt, small, small_opt, cut))
    small_pruner = build_pruner(small, small_opt, PruneSettings(method="state", target=0.5, start=1, end=2,
                                                                frequency=1))
    small_pruner.load_state_dict(surgery.carry_pruner(pruner.state_dict(), model, cut, 0))
    old_proj, new_proj = model.h[2].attn.c_proj.weight, small.h[2].attn.c_proj.weight
    old_mask = bitmask.unpack(opt.masks[old_proj], old_proj.shape)
    assert torch.equal(bitmask.unpack(small_opt.masks[new_proj], new_proj.shape), old_mask[:, 32:])
    assert torch.equal(small_pruner.mask("h.2.attn.c_proj.weight"), old_mask[:, 32:])
    zeros = sum(int((p == 0).sum()) for _, p in small_pruner.params)
    assert zeros > 0 and small_pruner.sparsity() == pytest.approx(zeros / small_pruner.prunable_count())


@pytest.mark.parametrize("build,architecture,message", [
    (lambda a: config_for("tiny", 256, 16, a), {"n_layer": 2, "heads": [4], "mlp": [512, 512]},
     r"heads \[4\] must give each of the 2 layers at least 1"),
    (lambda a: config_for("tiny", 256, 16, a), {"layers": 2}, "is not one GPT.architecture"),
    (lambda a: resnet18(10, a), {"blocks": [2, 2, 2, 2], "inner": [[64]], "streams": [64, 128, 256, 512]},
     "block counts and widths disagree"),
    (lambda a: __import__("lenet5.task", fromlist=["TASK"]).TASK.build_model(None, a), {"conv1": 0},
     "is not one LeNet5.architecture"),
])
def test_a_damaged_architecture_is_one_line(build, architecture, message) -> None:
    from lib.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build(architecture)
