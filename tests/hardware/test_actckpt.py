"""Activation checkpointing policies (lib/hardware/actckpt.py): the same loss and gradients as without, less saved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpt2.model import GPT, config_for
from lib.core.errors import ConfigError
from lib.hardware import actckpt, memory
from lib.hardware.actckpt import Segment, choose
from lib.hardware.memory import BlockProfile
from resnet.model import resnet18

POLICIES = ["uniform", "sqrt", "selective", "budget"]


def tiny_gpt() -> tuple[nn.Module, list[nn.Module], torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(config_for("tiny", vocab_size=256, block_size=32))
    return model, list(model.h), torch.randint(0, 256, (2, 32))


def tiny_resnet() -> tuple[nn.Module, list[nn.Module], torch.Tensor]:
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    return model, blocks, torch.randn(2, 3, 32, 32)


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


class Traced:
    """What one forward and backward did: the forwards of sub-modules run again during backward (the
    recomputation), and the bytes autograd saved for backward outside checkpointed segments. Without the
    first a checkpointing that did nothing would pass every equality test below."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], x: torch.Tensor) -> None:
        self.recomputed, self.saved_bytes = 0, 0
        hooks = [m.register_forward_pre_hook(self._count) for b in blocks for m in b.modules() if m is not b]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                self.loss, self.grads = _grads(model, x)
        finally:
            for hook in hooks:
                hook.remove()

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.recomputed += torch._C._current_graph_task_id() != -1  # a forward inside a backward pass

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved_bytes += tensor.numel() * tensor.element_size()
        return tensor


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """The bytes autograd saves for backward in one step of ``model`` (compiled or not: no module hooks), with
    that step's loss and gradients."""
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = _grads(model, x)
    return total[0], loss, grads


def _segments(policy: str, model: nn.Module, blocks: list[nn.Module], x: torch.Tensor) -> list[Segment]:
    """``policy``'s segments; budget: halfway between checkpointing every block and none (measured profile)."""
    profile = memory.profile(model, blocks, lambda: model(x).float().pow(2).mean())
    budget = (actckpt.peak_saved([Segment(i, i) for i in range(len(blocks))], profile)
              + actckpt.peak_saved([], profile)) / 2
    return choose(policy, len(blocks), every=2, budget=budget, profile=profile)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("build", [tiny_gpt, tiny_resnet], ids=["gpt2", "resnet18"])
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(policy: str, build) -> None:
    """Bit-identical on the CPU in float32: the recomputation repeats the same ops on the same inputs."""
    model, blocks, x = build()
    plain = Traced(model, blocks, x)
    segments = _segments(policy, model, blocks, x)
    assert segments and (policy != "budget" or len(segments) < len(blocks))
    actckpt.apply(blocks, segments)
    checkpointed = Traced(model, blocks, x)
    assert plain.recomputed == 0 and checkpointed.recomputed > 0  # the segments ran again in backward ...
    assert checkpointed.saved_bytes < plain.saved_bytes  # ... because less was saved for it
    assert torch.equal(checkpointed.loss, plain.loss)
    for a, b in zip(plain.grads, checkpointed.grads, strict=True):
        assert torch.equal(a, b)
    actckpt.remove(blocks)
    assert all("forward" not in vars(b) for b in blocks)


@pytest.mark.parametrize("policy", POLICIES)
def test_dropout_is_replayed_and_autocast_agrees(policy: str) -> None:
    """The recomputed forward draws the same dropout masks (torch replays the RNG state)."""
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.3)) for _ in range(4))
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(5)
            plain = Traced(model, list(blocks), x)
            segments = _segments(policy, model, list(blocks), x)
            torch.manual_seed(5)
            actckpt.apply(list(blocks), segments)
            torch.manual_seed(5)
            checkpointed = Traced(model, list(blocks), x)
            actckpt.remove(list(blocks))
        assert plain.recomputed == 0 and checkpointed.recomputed > 0  # dropout ran again, and drew the same
        assert torch.equal(checkpointed.loss, plain.loss)
        assert all(torch.equal(a, b) for a, b in zip(plain.grads, checkpointed.grads, strict=True))


def test_checkpointing_leaves_fewer_activation_bytes_alive() -> None:
    """Measured (glibc's malloc count on the CPU): sqrt at most half of none, every policy below none."""
    model, blocks, _ = tiny_gpt()
    x = torch.randint(0, 256, (8, 32))
    cpu = torch.device("cpu")

    def measured(policy: str) -> int:
        actckpt.apply(blocks, choose(policy, len(blocks)))
        try:
            actckpt.activation_bytes(lambda: model(x).pow(2).mean(), cpu)  # warm-up
            value = actckpt.activation_bytes(lambda: model(x).pow(2).mean(), cpu)
        finally:
            actckpt.remove(blocks)
        if value is None:
            pytest.skip("no allocator count here (not glibc >= 2.33)")
        return value

    none = measured("none")
    assert none > 4 * 2**20  # 8 x 32 tokens through 4 blocks of width 128
    assert measured("sqrt") <= 0.5 * none
    assert measured("uniform") < 0.75 * none
    assert measured("selective") < none


def test_plans() -> None:
    assert choose("none", 12) == []
    assert [s.first for s in choose("uniform", 12, every=3)] == [2, 5, 8, 11]
    sqrt = choose("sqrt", 12)
    assert len(sqrt) == 3 and sqrt[0].first == 0 and sqrt[-1].last == 11
    assert all(b.first == a.last + 1 for a, b in zip(sqrt, sqrt[1:], strict=False))
    assert all(s.selective for s in choose("selective", 3))
    profile = BlockProfile(total=10, blocks=(1, 4, 1, 2), inputs=(0, 0, 0, 0), kept=(0, 0, 0, 0))
    assert actckpt.peak_saved([], profile) == 10
    assert actckpt.peak_saved([Segment(1, 1)], profile) == 10 - 4 + 4  # the block comes back in backward
    # peak 10 -> 10 (block 1 comes back) -> 4 saved + 4 recomputed
    assert [s.first for s in choose("budget", 4, budget=8, profile=profile)] == [1, 3]
    assert [s.first for s in choose("budget", 4, budget=10, profile=profile)] == []


@pytest.mark.parametrize("kwargs, words", [
    ({"policy": "uniform", "n": 4, "every": 0}, "1 <= N <= 4"),
    ({"policy": "uniform", "n": 4, "every": 5}, "1 <= N <= 4"),
    ({"policy": "sqrt", "n": 0}, "has none"),
    ({"policy": "nonsense", "n": 4}, "valid: none, uniform"),
    ({"policy": "budget", "n": 2, "budget": 2**20, "profile": BlockProfile(3 * 2**20, (2**20, 2**20), (0, 0), (0, 0))},
     "ACTIVATION_BUDGET_MB=1: below the 2.0 MiB that checkpointing every block still needs"),
    ({"policy": "budget", "n": 2}, "no activation profile"),
])
def test_bad_input_is_one_line(kwargs: dict, words: str) -> None:
    kwargs = copy.deepcopy(kwargs)
    with pytest.raises(ConfigError, match=words) as info:
        choose(kwargs.pop("policy"), kwargs.pop("n"), **kwargs)
    assert "\n" not in str(info.value)


def test_the_plan_carries_the_policy_and_checks_it_against_the_model(make_config) -> None:
    from lib import config, hardware
    from lib.hardware import Devices, HardwareSettings
    from tests.hardware.test_hardware import gpt2, lenet

    cpu = Devices("cpu", cpu_cores=2)
    plan = hardware.plan(gpt2(), HardwareSettings(act_ckpt="sqrt"), cpu)
    assert plan.act_ckpt == "sqrt" and "activation checkpointing sqrt (ACTIVATION_CKPT_SQRT): 3 segment(s) over " \
                                      "12 of 12 blocks" in plan.rationale
    assert hardware.plan(gpt2(), HardwareSettings(), cpu).act_ckpt == "none"
    with pytest.raises(ConfigError, match=r"CONFIG_ACTIVATION_CKPT_EVERY=13: .* 1 <= N <= 12"):
        hardware.plan(gpt2(), HardwareSettings(act_ckpt="uniform", act_ckpt_every=13), cpu)
    with pytest.raises(ConfigError, match="has none: choose ACTIVATION_CKPT_NONE"):
        hardware.plan(lenet(), HardwareSettings(act_ckpt="selective"), cpu)
    cfg = config.load(make_config("CONFIG_ACTIVATION_CKPT_UNIFORM=y\nCONFIG_ACTIVATION_CKPT_EVERY=3\n"))
    assert (cfg.hardware.act_ckpt, cfg.hardware.act_ckpt_every) == ("uniform", 3)


@pytest.mark.parametrize("policy", ["uniform", "sqrt", "selective", "budget"])
def test_batch_norm_statistics_count_each_batch_once(policy: str) -> None:
    """A recomputed ResNet block would update its running statistics a second time; they are put back."""
    model, blocks, x = tiny_resnet()
    segments = _segments(policy, model, blocks, x)  # its profiling forward counts a batch too: copy after it
    plain = copy.deepcopy(model)
    _grads(plain, x)
    actckpt.apply(blocks, segments)
    assert Traced(model, blocks, x).recomputed > 0  # the batch norms ran a second time, in backward
    for (name, a), (_, b) in zip(plain.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("policies, build", [(POLICIES, tiny_gpt), (["sqrt", "selective"], tiny_resnet)],
                         ids=["gpt2", "resnet18"])
def test_inside_torch_compile_the_gradients_are_the_same(policies: list[str], build) -> None:
    """Where the trainer compiles (GPUs), dynamo traces the checkpoints and AOT autograd's partitioner does the
    recomputation. On the CPU the aot_eager backend runs that path without inductor's code generation (about
    3 s a model instead of a minute); the result is bit-identical to the eager step without checkpointing,
    running statistics included."""
    model, _, x = build()
    torch._dynamo.reset()
    compiled_plain = _saved_bytes(torch.compile(model, backend="aot_eager"), x)[0]  # what the partitioner saves
    for policy in policies:
        model, blocks, x = build()
        segments = _segments(policy, model, blocks, x)
        reference = copy.deepcopy(model)
        plain_loss, plain = _grads(reference, x)
        actckpt.apply(blocks, segments)
        torch._dynamo.reset()
        saved, loss, grads = _saved_bytes(torch.compile(model, backend="aot_eager"), x)
        assert saved < compiled_plain, policy  # the compiled graph recomputes rather than saves
        assert torch.equal(loss, plain_loss), policy
        assert all(torch.equal(a, b) for a, b in zip(plain, grads, strict=True)), policy
        assert all(torch.equal(a, b) for a, b in zip(reference.buffers(), model.buffers(), strict=True)), policy


def test_the_estimate_is_within_15_percent_of_the_measured_bytes() -> None:
    """lib/memory's profile by block (the plan's estimate) against glibc's malloc count, tiny GPT, CPU fp32."""
    model, blocks, _ = tiny_gpt()
    x = torch.randint(0, 256, (8, 32))
    profile = memory.profile(model, blocks, lambda: model(x).pow(2).mean())
    for policy in ("none", "uniform", "sqrt", "selective"):
        segments = choose(policy, len(blocks))
        actckpt.apply(blocks, segments)
        actckpt.activation_bytes(lambda: model(x).pow(2).mean(), torch.device("cpu"))  # warm-up
        measured = actckpt.activation_bytes(lambda: model(x).pow(2).mean(), torch.device("cpu"))
        actckpt.remove(blocks)
        if measured is None:
            pytest.skip("no allocator count here (not glibc >= 2.33)")
        estimate = actckpt.forward_saved(segments, profile)
        assert abs(estimate - measured) <= 0.15 * measured, (policy, estimate, measured)


def test_auto_checkpoints_only_when_the_target_micro_batch_does_not_fit() -> None:
    """GPT-2 124M at block 1024 on made-up GPUs: an idle A10G fits its table's micro-batch 8 without; with
    8 GiB free it does not, and the plan picks the cheapest policy that fits it, giving both estimates."""
    from lib import hardware
    from lib.hardware import HardwareSettings
    from tests.hardware.test_hardware import gpt2, lenet

    auto = HardwareSettings(act_ckpt="auto")
    idle = hardware.plan(gpt2(), auto, hardware.made_up("1x NVIDIA A10G:24"))
    assert (idle.act_ckpt, idle.act_ckpt_segments, idle.micro_batch) == ("none", (), 8)
    assert "activation checkpointing auto -> none: micro-batch 8 is estimated at 8.4 GiB without" in idle.rationale
    busy = hardware.plan(gpt2(), auto, hardware.made_up("1x NVIDIA A10G:24:8"))
    assert (busy.act_ckpt, busy.micro_batch, busy.grad_accum, len(busy.act_ckpt_segments)) == ("uniform", 8, 128, 6)
    assert ("activation checkpointing auto -> uniform: micro-batch 8 is estimated at 8.4 GiB without checkpointing "
            "and 6.9 GiB with uniform (7.2 GiB usable)") in busy.rationale
    plain = hardware.plan(gpt2(), HardwareSettings(), hardware.made_up("1x NVIDIA A10G:24:8"))
    assert plain.micro_batch == 4 and plain.grad_accum == 256  # the same GPU without checkpointing
    cpu = hardware.plan(gpt2(), auto, hardware.Devices("cpu", cpu_cores=2))
    assert cpu.act_ckpt == "none" and "auto -> none: on the CPU" in cpu.rationale
    small = hardware.plan(lenet(), auto, hardware.made_up("1x Made-up GPU:2:1.5"))
    assert small.act_ckpt == "none"


def test_the_budget_policy_plans_within_its_budget() -> None:
    from lib import hardware
    from lib.core.errors import HarnessError
    from lib.hardware import HardwareSettings
    from tests.hardware.test_hardware import gpt2

    spec = gpt2(batch=64)
    plan = hardware.plan(spec, HardwareSettings(act_ckpt="budget", act_budget_mb=3000),
                         hardware.made_up("1x NVIDIA A10G:24"))
    assert plan.act_ckpt == "budget" and 0 < len(plan.act_ckpt_segments) <= 12
    assert "(budget 3000 MiB, " in plan.rationale and plan.micro_batch <= 10
    profile = memory.activation_profiles(hardware.get_task("gpt2"), spec).at(plan.micro_batch)
    assert actckpt.peak_saved([Segment(*s) for s in plan.act_ckpt_segments], profile) <= 3000 * 2**20
    with pytest.raises(ConfigError, match=r"^CONFIG_ACTIVATION_BUDGET_MB=10: below the [\d.]+ MiB that "):
        hardware.plan(spec, HardwareSettings(act_ckpt="budget", act_budget_mb=10), hardware.Devices("cpu", cpu_cores=2))
    with pytest.raises(ConfigError, match="CONFIG_ACTIVATION_BUDGET_MB=0: the budget policy needs"):
        hardware.plan(spec, HardwareSettings(act_ckpt="budget"), hardware.Devices("cpu", cpu_cores=2))
    for text in ("1x A10G", "0x NVIDIA A10G:24", "1x NVIDIA A10G:24:30", "NVIDIA A10G:abc"):
        with pytest.raises(HarnessError, match=r"write COUNTx NAME:TOTAL_GIB\[:FREE_GIB\]"):
            hardware.made_up(text)
    assert hardware.made_up("2x NVIDIA H100 80GB HBM3:80").count == 2


def test_made_up_gpus_are_for_plans_only(make_config, capsys) -> None:
    from lib import cli

    path = make_config("")
    assert cli.main(["run", "--config", str(path), "--gpus", "1x NVIDIA A10G:24"]) == 2
    assert ("describes made-up GPUs for `make dry-run` and `make hwinfo` (and the compute nodes of the Slurm "
            "executor) only" in capsys.readouterr().err)
    gpt2 = make_config("CONFIG_MODEL_GPT2=y\nCONFIG_BATCH_SIZE=1024\nCONFIG_ACTIVATION_CKPT_AUTO=y\n")
    assert cli.main(["dry-run", "--config", str(gpt2), "--gpus", "1x NVIDIA A10G:24:8"]) == 0
    printed = capsys.readouterr().out
    assert "cuda 8x128x1=1024" in printed and "activation checkpointing auto -> uniform: micro-batch 8" in printed
    assert "activation checkpointing uniform (ACTIVATION_CKPT_AUTO): 6 segment(s) over 6 of 12 blocks" in printed
