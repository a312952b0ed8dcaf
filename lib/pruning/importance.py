"""Importance metrics for magnitude-style pruning, chosen by ``PruneSettings.importance``.
(docs/algorithms.md, "Importance metrics")

- ``magnitude``: ``|w|``. No state.
- ``gradient-sensitivity``: ``A += |w * g|`` every step, a first-order
  estimate of the loss change if the weight were removed. One float per weight.
- ``activation``: ``|w|`` times the running mean ``|x|`` of the input unit
  the weight reads (Linear: input feature; Conv: input channel), gathered by
  forward pre-hooks in training mode. One float per input unit.

Accumulation starts at step 1, not at pruning start, so that the first mask
update already ranks on a history rather than on a single batch. Adding a
metric: subclass ``Importance`` and add one line to ``IMPORTANCES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lib.core.registry import lookup

Params = list[tuple[str, nn.Parameter]]


class Importance:
    """A per-weight score (high = keep); may keep state updated every step."""

    name: ClassVar[str] = "base"

    def __init__(self, model: nn.Module, params: Params):
        self.model = model
        self.params = params

    def accumulate(self) -> None:
        """Per-step work, called after backward and before pruned gradients are zeroed."""

    def sync(self) -> None:
        """Called once before each mask update (e.g. to average statistics over DDP ranks)."""

    def score(self, name: str, param: nn.Parameter) -> Tensor:
        """Score of each entry of ``param`` (same shape); the lowest are pruned."""
        raise NotImplementedError

    def score_at(self, name: str, param: nn.Parameter, index: Tensor) -> Tensor:
        """The score at flattened positions ``index`` only (for the sampled threshold)."""
        return self.score(name, param).reshape(-1)[index]

    def buffers(self) -> Iterable[Tensor]:
        """Tensors held between steps (counted as pruning buffers)."""
        return ()

    def close(self) -> None:
        """Detach anything attached to the model."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Magnitude(Importance):
    """``|w|``."""

    name = "magnitude"

    def score(self, name: str, param: nn.Parameter) -> Tensor:
        return param.detach().abs()

    def score_at(self, name: str, param: nn.Parameter, index: Tensor) -> Tensor:
        return param.detach().reshape(-1)[index].abs()


class GradientSensitivity(Importance):
    """Accumulated ``|w * g|`` (float32, one per weight)."""

    name = "gradient-sensitivity"

    def __init__(self, model: nn.Module, params: Params):
        super().__init__(model, params)
        self.acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}

    @torch.no_grad()
    def accumulate(self) -> None:
        for name, param in self.params:
            if param.grad is not None:
                self.acc[name].add_((param.detach() * param.grad).abs_())

    def score(self, name: str, param: nn.Parameter) -> Tensor:
        return self.acc[name]

    def buffers(self) -> Iterable[Tensor]:
        return self.acc.values()

    def state_dict(self) -> dict[str, Any]:
        return {"acc": dict(self.acc)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.get("acc", {}).items():
            self.acc[name].copy_(value)


class Activation(Importance):
    """``|w|`` scaled by the running mean ``|input|`` of each input feature (Linear) or channel (Conv)."""

    name = "activation"

    def __init__(self, model: nn.Module, params: Params):
        super().__init__(model, params)
        self.mean: dict[str, Tensor] = {}  # name -> running mean |x| per input unit (float32)
        self.seen: dict[str, float] = {}  # name -> number of input vectors averaged so far
        self.handles: list[Any] = []
        for name, param in params:
            module = model.get_submodule(name.rpartition(".")[0])
            units = param.shape[1] * getattr(module, "groups", 1)  # in_features or in_channels
            self.mean[name] = torch.zeros(units, dtype=torch.float32, device=param.device)
            self.seen[name] = 0.0
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if module.training and args and isinstance(args[0], Tensor):
                self._observe(name, module, args[0].detach())

        return hook

    @torch.no_grad()
    def _observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        mean = self.mean[name]
        if isinstance(module, nn.Linear):  # (..., in_features)
            dims = tuple(range(x.dim() - 1))
        else:  # Conv: (N, C, *spatial), or unbatched (C, *spatial)
            x = x if x.dim() == module.weight.dim() else x.unsqueeze(0)
            dims = (0, *range(2, x.dim()))
        n = x.numel() // mean.numel()  # input vectors in this batch
        if n == 0:
            return
        batch = torch.mean(x.abs(), dim=dims, dtype=torch.float32)
        self.seen[name] += n
        mean.add_((batch - mean) * (n / self.seen[name]))

    def sync(self) -> None:
        """Average the statistics over DDP ranks, which saw different data, so every rank prunes alike."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for mean in self.mean.values():
                torch.distributed.all_reduce(mean)
                mean.div_(world)

    def score(self, name: str, param: nn.Parameter) -> Tensor:
        if not self.seen[name]:
            return param.detach().abs()  # no activation observed yet: plain magnitude
        return param.detach().abs() * self._unit_scale(name, param)

    def _unit_scale(self, name: str, param: nn.Parameter) -> Tensor:
        """The per-input-unit mean shaped to broadcast against ``param``."""
        mean = self.mean[name].to(param.dtype)
        if param.dim() == 2:  # Linear (out, in)
            return mean
        out, per_group = param.shape[0], param.shape[1]
        groups = mean.numel() // per_group
        # Output channel o of a grouped conv reads the input channels of group o // (out / groups).
        scale = mean.view(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)
        return scale.view(out, per_group, *([1] * (param.dim() - 2)))

    def buffers(self) -> Iterable[Tensor]:
        return self.mean.values()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "seen": dict(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.get("mean", {}).items():
            self.mean[name].copy_(value)
        self.seen.update(state.get("seen", {}))


IMPORTANCES: dict[str, type[Importance]] = {
    "magnitude": Magnitude,
    "gradient-sensitivity": GradientSensitivity,
    "activation": Activation,
}


def build_importance(name: str, model: nn.Module, params: Params) -> Importance:
    """The metric ``name`` for ``params`` of ``model``; an unknown name is a ConfigError listing the valid ones."""
    cls = lookup(IMPORTANCES, name, "importance metric (PRUNING_IMPORTANCE)", "lib/pruning/importance.py")
    return cls(model, params)
