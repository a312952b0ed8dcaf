"""Optimizer registry and parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings
from lib.optim import OPTIMIZERS, build_optimizer, param_groups


class TinyLM(nn.Module):
    """Embedding, conv, norm and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.fc(self.norm(h)))


def settings(name: str, **kw: object) -> OptimSettings:
    return OptimSettings(name=name, lr=1e-3, weight_decay=0.1, **kw)  # type: ignore[arg-type]


def decay_of(groups: list[dict]) -> dict[str, float]:
    return {name: g["weight_decay"] for g in groups for name, _ in g["params"]}


def test_weight_decay_only_on_matrices_and_kernels() -> None:
    wd = decay_of(param_groups(TinyLM(), 0.1))
    assert wd == {
        "embed.weight": 0.0,
        "conv.weight": 0.1,
        "conv.bias": 0.0,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "fc.weight": 0.1,
        "fc.bias": 0.0,
    }


def test_every_parameter_once_and_tied_head_deduplicated() -> None:
    model = TinyLM()
    params = [p for g in param_groups(model, 0.1) for _, p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert sum(p is model.head.weight for p in params) == 1


def test_tied_head_registered_first_still_gets_no_decay() -> None:
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Embedding(6, 4))
    model[0].weight = model[1].weight
    assert decay_of(param_groups(model, 0.1)) == {"0.weight": 0.0}


@pytest.mark.parametrize(
    "name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_build_each_optimizer(name: str, cls: type) -> None:
    model = TinyLM()
    opt = build_optimizer(model, settings(name, beta1=0.8, beta2=0.95, eps=1e-6, momentum=0.5, nesterov=True))
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert group["param_names"][0] == "conv.weight"  # names survive into the optimizer's state dict
    if name == "sgd":
        assert (group["momentum"], group["nesterov"]) == (0.5, True)
    else:
        assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6)
    # One step and a state-dict round trip work with the named groups.
    model(torch.randint(0, 11, (2, 5))).sum().backward()
    opt.step()
    fresh = build_optimizer(model, settings(name))
    fresh.load_state_dict(opt.state_dict())


def test_options_reach_torch() -> None:
    opt = build_optimizer(TinyLM(), settings("adamw"), fused=True)
    assert opt.param_groups[0]["fused"] is True
    default = build_optimizer(TinyLM(), settings("adamw"))
    assert default.param_groups[0]["fused"] is True  # fused wherever torch supports it (here: the CPU)
    foreach = build_optimizer(TinyLM(), settings("adamw"), foreach=True)
    assert not foreach.param_groups[0]["fused"] and foreach.param_groups[0]["foreach"] is True


def test_unknown_optimizer_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_optimizer(TinyLM(), settings("lion"))
    message = str(info.value)
    assert "lion" in message and ", ".join(sorted(OPTIMIZERS)) in message and "\n" not in message


def test_bad_hyperparameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="adam"):
        build_optimizer(TinyLM(), settings("adam", beta1=1.5))
    with pytest.raises(ConfigError, match="Nesterov"):
        build_optimizer(TinyLM(), settings("sgd", momentum=0.0, nesterov=True))
