"""Activation checkpointing policies (lib/actckpt.py): the same loss and gradients as without, less saved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpt2.model import GPT, config_for
from lib import actckpt
from lib.actckpt import Segment, choose
from lib.errors import ConfigError
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


def _segments(policy: str, n: int) -> list[Segment]:
    sizes = [2**20 * (1 + i % 3) for i in range(n)]
    return choose(policy, n, every=2, budget=0.6 * sum(sizes), block_bytes=sizes)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("build", [tiny_gpt, tiny_resnet], ids=["gpt2", "resnet18"])
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(policy: str, build) -> None:
    """Bit-identical on the CPU in float32: the recomputation repeats the same ops on the same inputs."""
    model, blocks, x = build()
    plain_loss, plain = _grads(model, x)
    segments = _segments(policy, len(blocks))
    assert segments
    actckpt.apply(blocks, segments)
    loss, grads = _grads(model, x)
    assert torch.equal(loss, plain_loss)
    for a, b in zip(plain, grads, strict=True):
        assert torch.equal(a, b)
    actckpt.remove(blocks)
    assert all("forward" not in vars(b) for b in blocks)


def test_dropout_is_replayed_and_autocast_agrees() -> None:
    """The recomputed forward draws the same dropout masks (torch replays the RNG state)."""
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.3)) for _ in range(4))
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(5)
            plain_loss, plain = _grads(model, x)
            actckpt.apply(list(blocks), choose("sqrt", 4))
            torch.manual_seed(5)
            loss, grads = _grads(model, x)
            actckpt.remove(list(blocks))
        assert torch.equal(loss, plain_loss)
        assert all(torch.equal(a, b) for a, b in zip(plain, grads, strict=True))


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
    big_first = choose("budget", 4, budget=5.0, block_bytes=[1.0, 4.0, 1.0, 2.0])
    assert [s.first for s in big_first] == [1]  # 8 -> 4.5 after the largest


@pytest.mark.parametrize("kwargs, words", [
    ({"policy": "uniform", "n": 4, "every": 0}, "1 <= N <= 4"),
    ({"policy": "uniform", "n": 4, "every": 5}, "1 <= N <= 4"),
    ({"policy": "sqrt", "n": 0}, "has none"),
    ({"policy": "nonsense", "n": 4}, "valid: none, uniform"),
    ({"policy": "budget", "n": 2, "budget": 1.0, "block_bytes": [2**20, 2**20]}, "below what checkpointing"),
])
def test_bad_input_is_one_line(kwargs: dict, words: str) -> None:
    kwargs = copy.deepcopy(kwargs)
    with pytest.raises(ConfigError, match=words) as info:
        choose(kwargs.pop("policy"), kwargs.pop("n"), **kwargs)
    assert "\n" not in str(info.value)


def test_the_plan_carries_the_policy_and_checks_it_against_the_model(make_config) -> None:
    from lib import config, hardware
    from lib.hardware import Devices, HardwareSettings
    from tests.test_hardware import gpt2, lenet

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
