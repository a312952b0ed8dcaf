"""Checkpoint-time surgery: lib/surgery/cut.py, lib/surgery/dependency.py, lib/surgery/command.py.
(issue 14; docs/algorithms.md, "Structure statistics and surgery")

The smaller model must compute what the masked model computes, carry every surviving weight's
optimizer state bit for bit, and take the same next step; a rolled-back surgery must leave the
original checkpoint byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2.model import GPT, config_for
from lenet5.model import LeNet5
from lib.core.errors import HarnessError
from lib.core.spec import OptimSettings, PruneSettings
from lib.core.structures import residual_blocks, structures
from lib.optim import build_optimizer
from lib.pruning import build_pruner
from lib.surgery import cut as surgery
from lib.surgery import dependency
from lib.surgery.command import operate
from resnet.model import resnet18
from tests.conftest import ROOT, folder_states
from tests.test_gpt2 import synthetic_spec

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


# -- the command --------------------------------------------------------------------------------


def _trained_run(tmp_path: Path, prune: PruneSettings | None = None, max_loss_increase: float = 0.5,
                 **train) -> Path:
    """A trained tiny-GPT run folder (its output in tmp_path/stdout.txt)."""
    settings = {"max_iters": 20, "structure_stats_every": 5, "ckpt_interval": 10, "ckpt_milestone": 10, **train}
    spec = synthetic_spec(tmp_path, **settings)
    spec = dataclasses.replace(spec, prune=prune or spec.prune,
                               surgery=dataclasses.replace(spec.surgery, max_loss_increase=max_loss_increase))
    run_dir = tmp_path / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    done = subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "stdout.txt").write_text(done.stdout)
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return _trained_run(tmp_path_factory.mktemp("surgery"))


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("surgery.json", "train.lock")}


def test_surgery_then_continue_trains_the_smaller_model(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    assert folder_states(tmp_path, run_dir.name) == ("ok", "ok", "1 ok")
    lines: list[str] = []
    record = operate(run_dir, "0.25", None, say=lines.append)
    assert folder_states(tmp_path, run_dir.name) == ("cut", "cut", "1 cut")  # one word everywhere, not "stopped"
    assert "restore the file" not in (tmp_path / "report.md").read_text()
    assert record["accepted"] and record["source"] == "statistics"
    assert record["removed"] == {"head": 4, "neuron": 512}  # a quarter of 4 layers x (4 heads, 512 neurons)
    assert record["architecture"]["after"] == {"n_layer": 4, "heads": [3] * 4, "mlp": [384] * 4}
    measured = record["measured"]
    for key in ("parameters", "checkpoint_bytes", "optimizer_state_bytes", "training_memory_bytes"):
        assert measured[key]["after"] < measured[key]["before"], key
    assert lines[0].startswith("surgery: checkpoints/milestones/step_00000010.ckpt (step 10): removing 4 heads, "
                               "512 neurons chosen from statistics")
    assert "| parameters |" in lines[1] and lines[2].startswith("surgery accepted: 4 heads, 512 neurons")
    assert (run_dir / "checkpoints" / "before_surgery" / "step_00000010.ckpt").is_file()
    assert not (run_dir / "summary.json").exists() and (run_dir / "summary.before_surgery.json").exists()
    done = subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed"]["from_steps"] == [10]
    assert summary["steps"]["done"] == 20 and summary["surgery"][0]["removed"] == {"head": 4, "neuron": 512}
    assert summary["sparsity"]["total_params"] == measured["parameters"]["after"]
    assert summary["sparsity"]["reached"] == pytest.approx(0.25)  # the removed quarter counts as pruned
    assert summary["sparsity"]["cut_by_surgery"] == pytest.approx(0.25)  # ... and says so
    assert folder_states(tmp_path, run_dir.name) == ("ok", "ok", "1 ok")
    assert "25.0% (25.0% cut by surgery) / 0%" in (tmp_path / "report.md").read_text()
    assert json.loads((run_dir / "surgery.json").read_text())[0]["accepted"] is True
    assert (run_dir / "checkpoints" / "before_surgery" / "best.pt").is_file()  # the uncut model's best, aside
    assert summary["best"]["step"] > 10  # chosen among the cut model's evaluations
    from lib.checkpoint.export import export, load_export

    exported, _ = load_export(export(run_dir))  # rebuilt from the recorded architecture
    assert sum(p.numel() for p in exported.parameters()) == measured["parameters"]["after"]
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    structure = card["structure"]  # the cut is in the card beside the (near) zero fraction
    assert structure["parameters_as_built"] == measured["parameters"]["before"]
    assert structure["parameters_now"] == measured["parameters"]["after"] < structure["parameters_as_built"]
    assert structure["reduction"] == pytest.approx(1 - structure["parameters_now"] / structure["parameters_as_built"])
    assert "tokenizer" in card["usage"] and "GELU" in card["usage"]["forward"]


def test_rollback_leaves_every_file_byte_identical(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    spec = json.loads((run_dir / "spec.json").read_text())
    spec["surgery"]["max_loss_increase"] = 0.0
    (run_dir / "spec.json").write_text(json.dumps(spec))
    before = _digest(run_dir)
    with pytest.raises(HarnessError, match=r"surgery rolled back: validation loss rose 0\.\d+ .* is untouched"):
        operate(run_dir, "0.5", "neurons")
    assert _digest(run_dir) == before
    assert json.loads((run_dir / "surgery.json").read_text())[-1]["accepted"] is False


@pytest.mark.parametrize("fraction,structure,message", [
    ("0", None, r"FRACTION=0 is outside \(0, 1\)"),
    ("1.5", None, r"FRACTION=1\.5 is outside \(0, 1\)"),
    ("half", None, "FRACTION='half' is not a number"),
    ("0.9", "heads", r"FRACTION=0\.9 would remove all 4 heads of h\.0\.attn; one must stay"),
    ("0.9", "blocks", "would remove all 4 blocks; one must stay"),
    ("0.3", "layers", "surgery structure 'layers' is not one of all, heads"),
    ("0.3", "channels", "GPT has no channels; it has heads, neurons"),
    ("0.01", "heads", "rounds to no whole structure"),
])
def test_bad_fractions_and_structures_are_one_line(trained: Path, tmp_path: Path, fraction, structure,
                                                    message) -> None:
    run_dir = _copy(trained, tmp_path)
    before = _digest(run_dir)
    with pytest.raises(HarnessError, match=message):
        operate(run_dir, fraction, structure)
    assert _digest(run_dir) == before


def test_a_run_without_statistics_or_masks_is_refused(tmp_path: Path) -> None:
    run_dir = _trained_run(tmp_path, structure_stats_every=0, max_iters=12)
    with pytest.raises(HarnessError, match="no structure statistics and no structured masks; train with "
                                           "CONFIG_STRUCTURE_STATS_EVERY"):
        operate(run_dir, None, None)


def test_a_checkpoint_of_another_model_and_other_folders_are_refused(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained, tmp_path)
    spec = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**spec, "model": "lenet5"}))
    with pytest.raises(HarnessError, match="is of model 'gpt2', but the run trains 'lenet5'"):
        operate(run_dir)
    with pytest.raises(HarnessError, match="not a run folder"):
        operate(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spec.json").write_text((trained / "spec.json").read_text())
    with pytest.raises(HarnessError, match="has no training checkpoint .*CONFIG_CKPT_MILESTONE"):
        operate(empty)


def test_structured_runs_are_cut_where_their_masks_are(tmp_path: Path) -> None:
    prune = PruneSettings(method="structured", target=0.3, start=2, end=6, frequency=2)
    run_dir = _trained_run(tmp_path, prune, max_iters=12, ckpt_interval=4, ckpt_milestone=4, structure_stats_every=0)
    with pytest.raises(HarnessError, match="masks of this structured run decide what goes; drop FRACTION="):
        operate(run_dir, "0.3", None)
    record = operate(run_dir, say=lambda line: None)
    assert record["source"] == "masks" and record["step"] == 8  # the newest milestone: the run finished
    assert record["val_loss"]["rise"] == pytest.approx(0.0, abs=1e-4)  # exactly the masked model
    assert record["prunable_weights_removed"] >= 0.29 * 4 * 12 * 128 * 128


def test_make_surgery_prints_one_line_on_bad_input(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lib.cli", "surgery", "--run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path}: not a run folder (no spec.json); give "
                                                f"RUN=results/<folder>/<run>"]


def test_the_report_lists_the_surgeries() -> None:
    from lib.results import Run
    from lib.results.report import _surgeries

    entry = {"step": 200, "source": "statistics", "removed": {"head": 4, "neuron": 616},
             "val_loss": {"before": 5.5473, "after": 5.5799}}
    lines = _surgeries([Run({"name": "a", "surgery": [entry]}), Run({"name": "b"})])
    assert "| a | 200 | statistics | 4 heads, 616 neurons | 5.5473 -> 5.5799 |" in lines
    assert not any("| b |" in line for line in lines) and _surgeries([Run({"name": "b"})]) == []


def test_surgery_every_cuts_inside_the_run_and_a_rollback_trains_on_uncut(tmp_path: Path) -> None:
    run_dir = _trained_run(tmp_path / "cut", max_iters=20, surgery_every=10, ckpt_interval=0, ckpt_milestone=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"]["done"] == 20 and "resumed" not in summary
    assert [s["step"] for s in summary["surgery"]] == [10] and summary["surgery"][0]["source"] == "statistics"
    assert summary["sparsity"]["total_params"] < 803_584  # the tiny GPT at vocabulary 256 has 803,584
    run_dir = _trained_run(tmp_path / "uncut", max_loss_increase=0.0, surgery_every=10, ckpt_interval=0,
                           ckpt_milestone=0)
    stdout = (tmp_path / "uncut" / "stdout.txt").read_text()
    assert "gpt2_tiny: no cut at step 10: surgery rolled back: validation loss rose" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and "surgery" not in summary and summary["sparsity"]["total_params"] == 803_584


def test_lenet5_is_cut_through_the_dependency_graph_and_trains_on(tmp_path: Path) -> None:
    from tests.conftest import tiny_spec

    spec = tiny_spec("lenet", max_iters=12, structure_stats_every=2, ckpt_interval=6, ckpt_milestone=6)
    spec = dataclasses.replace(spec, surgery=dataclasses.replace(spec.surgery, max_loss_increase=10.0))
    run_dir = tmp_path / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, timeout=300).returncode == 0
    with pytest.raises(HarnessError, match="LeNet5 has no heads; it has channels, units"):
        operate(run_dir, "0.3", "heads")
    with pytest.raises(HarnessError, match="LeNet5 has no residual blocks to remove"):
        operate(run_dir, "0.3", "blocks")
    record = operate(run_dir, "0.25", "channels", say=lambda line: None)
    assert record["removed"] == {"channel": 6} and record["architecture"]["after"]["conv2"] == 12
    assert subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, timeout=300).returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["surgery"][0]["removed"] == {"channel": 6}


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


@pytest.mark.parametrize("lines,message", [
    ('CONFIG_SURGERY_FRACTION="1.5"\n', r"CONFIG_SURGERY_FRACTION=1\.5 is outside \(0\.0, 1\.0\)"),
    ('CONFIG_SURGERY_FRACTION="most"\n', "CONFIG_SURGERY_FRACTION='most' is not a number"),
    ('CONFIG_SURGERY_STRUCTURE="layers"\n', "surgery structure 'layers' is not one of all, heads, neurons"),
    ('CONFIG_SURGERY_MAX_LOSS_INCREASE="-1"\n', r"CONFIG_SURGERY_MAX_LOSS_INCREASE=-1 is outside \[0\.0"),
    ("CONFIG_SURGERY_EVERY=50\n", "CONFIG_SURGERY_EVERY has no effect: it depends on STRUCTURE_STATS_EVERY != 0"),
])
def test_bad_surgery_settings_are_one_line(make_config, lines: str, message: str) -> None:
    from lib import config
    from lib.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config.load(make_config("CONFIG_MODEL_LENET5=y\n", extra=lines))  # as a user edits .config


def test_surgery_settings_reach_the_run_spec(make_config) -> None:
    from lib import config, matrix
    from lib.hardware import Devices

    path = make_config('CONFIG_MODEL_LENET5=y\nCONFIG_STRUCTURE_STATS_EVERY=5\nCONFIG_SURGERY_EVERY=50\n'
                       'CONFIG_SURGERY_FRACTION="0.2"\nCONFIG_SURGERY_STRUCTURE="units"\n'
                       'CONFIG_SURGERY_MAX_LOSS_INCREASE="0.1"\n')
    spec = matrix.expand(config.load(path), Devices(kind="cpu", cpu_cores=2))[0]
    assert (spec.train.structure_stats_every, spec.train.surgery_every) == (5, 50)
    assert (spec.surgery.fraction, spec.surgery.structure, spec.surgery.max_loss_increase) == (0.2, "units", 0.1)


def test_surgery_refuses_a_run_being_trained(trained: Path, tmp_path: Path) -> None:
    from lib.core import runlock

    run_dir = _copy(trained, tmp_path)
    before = _digest(run_dir)
    held = runlock.lock(run_dir)  # as a live trainer holds it
    try:
        with pytest.raises(HarnessError, match="is being trained by PID"):
            operate(run_dir, "0.3", None)
    finally:
        os.close(held)
    assert _digest(run_dir) == before


def test_cli_lines_for_missing_run_and_a_continue_folder_that_is_not_one(make_config, tmp_path, capsys) -> None:
    from lib.cli import main

    assert main(["surgery"]) == 2
    assert capsys.readouterr().err.strip() == ("error: surgery needs a run folder: "
                                               "`make surgery RUN=results/<folder>/<run> [FRACTION=0.3]`")
    config = make_config("CONFIG_MODEL_LENET5=y\n")
    assert main(["--config", str(config), "continue", "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path} is not a results folder made by `make` "
                                               f"(no readable matrix.json)")


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
