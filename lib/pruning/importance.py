"""Importance metrics for magnitude-style pruning, chosen by ``PruneSettings.importance``.
(docs/algorithms.md, "Importance metrics")

- ``magnitude``: ``|w|``. No state.
- ``gradient-sensitivity``: ``A += |w * g|`` every step, a first-order
  estimate of the loss change if the weight were removed. One float per weight.
- ``activation``: ``|w|`` times the running mean ``|x|`` of the input unit
  the weight reads (Linear: input feature; Conv: input channel), gathered by
  forward pre-hooks in training mode. One float per input unit.
- ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): ``|w|``
  times the L2 norm of the input unit over every calibration token (a sum of squares per unit, the root taken
  when scored), compared only within each output row (``per_row``). A one-shot metric of `make sweep`, not
  offered for training (``one_shot``).

Accumulation starts at step 1, not at pruning start, so that the first mask
update already ranks on a history rather than on a single batch. Adding a
metric: subclass ``Importance`` and add one line to ``IMPORTANCES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lib.core.registry import lookup

Params = list[tuple[str, nn.Parameter]]


class Importance:
    """A per-weight score (high = keep); may keep state updated every step."""

    name: ClassVar[str] = "base"
    per_row: ClassVar[bool] = False  # weights compete only within their output row (Wanda), not globally
    one_shot: ClassVar[bool] = False  # `make sweep` only: the training choices do not offer it

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
        x, dims = _per_unit(module, x)
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


class Wanda(Activation):
    """``|w| * ||x||_2`` per input unit over the calibration tokens, compared within each output row. ``mean``
    holds the sum of squares here (the DDP average of a sum ranks alike)."""

    name = "wanda"
    per_row = True
    one_shot = True

    @torch.no_grad()
    def _observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        x, dims = _per_unit(module, x)
        n = x.numel() // self.mean[name].numel()
        if n == 0:
            return
        self.mean[name].add_(torch.sum(x.to(torch.float32).square(), dim=dims))
        self.seen[name] += n

    def _unit_scale(self, name: str, param: nn.Parameter) -> Tensor:
        return super()._unit_scale(name, param).sqrt()


def _per_unit(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` (a batch of the layer's input) and the dims that run over input vectors, leaving the input unit:
    Linear (..., in_features); Conv (N, C, *spatial), an unbatched (C, *spatial) given a batch dim."""
    if isinstance(module, nn.Linear):
        return x, tuple(range(x.dim() - 1))
    x = x if x.dim() == module.weight.dim() else x.unsqueeze(0)
    return x, (0, *range(2, x.dim()))


@contextlib.contextmanager
def observing(model: nn.Module, params: Params) -> Iterator[None]:
    """``model`` in eval mode (dropout off, batch norm statistics fixed) with the layers of ``params`` in training
    mode, so the activation hooks observe them (Linear and Conv compute alike in both modes); the model's own
    mode comes back after."""
    was_training = model.training
    try:
        model.eval()
        for name, _ in params:
            model.get_submodule(name.rpartition(".")[0]).train()
        yield
    finally:
        model.train(was_training)


IMPORTANCES: dict[str, type[Importance]] = {
    "magnitude": Magnitude,
    "gradient-sensitivity": GradientSensitivity,
    "activation": Activation,
    "wanda": Wanda,
}


def build_importance(name: str, model: nn.Module, params: Params) -> Importance:
    """The metric ``name`` for ``params`` of ``model``; an unknown name is a ConfigError listing the valid ones."""
    cls = lookup(IMPORTANCES, name, "importance metric (PRUNING_IMPORTANCE)", "lib/pruning/importance.py")
    return cls(model, params)
