"""``adamwprune``: an AdamW-family optimizer that prunes from its own state (docs/algorithms.md, "AdamWPrune").

``AdamWPrune`` wraps a base optimizer, torch's ``AdamW`` (``base="adamw"``,
fused kernel where torch has one for the parameters' device) or ``AdamWSPAM``
(``base="adamwspam"``), and adds only a pruning mask:

- ``param_groups`` and ``state`` ARE the base's (shared, not copied), so the
  trainer's learning-rate writes reach the base and ``state[p]`` exposes
  ``exp_avg`` / ``exp_avg_sq`` to the state pruner and to memory accounting.
- ``step()`` is the base's own step, untouched. With no masks (pruning off)
  AdamWPrune is therefore bit-identical to its base optimizer.
- The masks live in ``self.masks`` (param -> bit-packed uint8, 1 bit per
  weight; lib/optim/bitmask.py): the one mask store of a state-pruned run, in
  the spirit of JaxPruner's masks kept inside the optimizer state. The state
  pruner (lib/pruning/state.py) decides them and reads them through a view
  by name, without a copy; it also carries them into checkpoints, so this
  optimizer's ``state_dict`` holds no masks and nothing has to keep two copies
  alike. They are kept apart from ``self.state`` on purpose: they are pruning
  buffers, reported by the state pruner's ``buffer_bytes()``, and
  lib/hardware/memory.state_bytes (which sums ``optimizer.state``) must not
  count them a second time.

With ``fused`` on (the plan's FUSED_STEP, lib/hardware/__init__.py) and masks set, ``step()``
applies the mask inside the update (lib/optim/masked_step.py): one pass per masked
tensor reads p, g, m, v and the packed bits once and writes p, m, v once, pruned
entries as +0.0, so ``mask_gradients()`` has nothing left to do, unless something
reads the gradients between backward and step (gradient clipping:
``grads_read_before_step``), which must not count pruned weights.

Between mask updates the only other pruning work is ``mask_gradients()``: once
``set_masks`` has zeroed a pruned weight and its exp_avg / exp_avg_sq (and
max_exp_avg_sq), a zero gradient keeps all of them exactly zero under AdamW
(``m = b1*0 + (1-b1)*0``, ``0 / (sqrt(0) + eps) = 0``, decay of 0 is 0) and
under AdamWSPAM (a zero gradient is never a spike; resets zero moments anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.errors import ConfigError
from lib.core.registry import lookup
from lib.core.shards import local
from lib.core.spec import OptimSettings
from lib.optim import bitmask, masked_step


class AdamWPrune(torch.optim.Optimizer):
    """``base``'s update rule plus an optimizer-owned, bit-packed pruning mask (module docstring)."""

    def __init__(self, base: torch.optim.Optimizer, base_name: str = "adamw", fused: bool = False):
        self.base = base
        self.base_name = base_name
        self.fused = fused  # masks applied inside the update (lib/optim/masked_step.py)
        self.grads_read_before_step = False  # True when the trainer clips gradients: mask them first
        state = base.state
        # Optimizer.__init__ sets up hooks and re-validates the base's group dicts (the same objects,
        # already complete); the ``state`` / ``param_groups`` properties below forward its writes to
        # the base, so afterwards restore the base's state object.
        super().__init__(base.param_groups, base.defaults)
        base.state = state
        self.masks: dict[Tensor, Tensor] = {}  # param -> packed keep-mask; the optimizer-owned mask store

    # The base's containers, never copies (see the module docstring).
    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    # -- the update: the base's own step --------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The base optimizer's step; with ``fused`` and masks set, masked tensors take the fused masked step."""
        if not (self.fused and self.masks):
            return self.base.step(closure)  # call mask_gradients() first when masks are set
        return masked_step.step(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def fused_kernel_takes(self, param: Tensor) -> bool:
        """Whether the fused masked step has a kernel for ``param`` and its state (lib/optim/compact.py asks)."""
        return masked_step.kernel_takes(self, param)

    # -- the mask -------------------------------------------------------------------------------

    @torch.no_grad()
    def set_masks(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Install keep-masks and zero what they prune: the mask-update entry point.

        ``masks`` maps a parameter to its keep-mask, bool shaped like the
        parameter or already packed (uint8, ``bitmask.packed_size`` bytes).
        Pruned entries of the weight and of every state tensor shaped like it
        (exp_avg, exp_avg_sq, max_exp_avg_sq) become exactly zero.
        """
        for param, mask in masks.items():
            weight = local(param.data)  # sharded (FSDP2): this rank's shard, and the mask is the shard's
            if mask.dtype == torch.bool:
                if mask.shape != weight.shape:
                    raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(weight.shape)}")
                packed = bitmask.pack(mask.to(weight.device))
            else:
                packed = mask.to(device=weight.device, dtype=torch.uint8)
            bitmask.apply_(weight, packed)
            for value in self.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    bitmask.apply_(local(value), packed)
            self.masks[param] = packed

    def clear_masks(self) -> None:
        """Drop every mask (pruned weights stay zero until the optimizer moves them)."""
        self.masks.clear()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights (after backward, before step); the fused step needs no such pass."""
        if self.fused and masked_step.fusable(self) and not self.grads_read_before_step:
            return
        for param, packed in self.masks.items():
            if param.grad is not None:
                bitmask.apply_(local(param.grad), packed)

    def mask_bytes(self) -> int:
        """Bytes of the packed masks (1 bit per masked weight, rounded up per tensor)."""
        return sum(packed.numel() for packed in self.masks.values())

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict; the masks travel in the state pruner's (module docstring)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base; masks already installed (the pruner may load first) are applied to the loaded state."""
        state_dict = {key: value for key, value in state_dict.items() if key != "masks"}  # a copy older files held
        self.base.load_state_dict(state_dict)
        self.set_masks(dict(self.masks))


# -- factories ----------------------------------------------------------------------------------


def _build_adamw(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """The registry's own AdamW (fused where supported), so pruning off is exactly `adamw`."""
    from lib.optim import adamw

    return adamw.build(model, settings, **options)


def _build_adamwspam(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """AdamWSPAM with the SPAM settings of ``settings`` (imported here: only this base needs it)."""
    from lib.optim import adamwspam

    return adamwspam.build(model, settings, **options)


BASES: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _build_adamw, "adamwspam": _build_adamwspam}


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> AdamWPrune:
    """AdamWPrune over ``model`` on the base ``settings.base`` (empty = ``adamw``)."""
    base_name = settings.base or "adamw"
    factory = lookup(BASES, base_name, "AdamWPrune base optimizer (ADAMWPRUNE_BASE)", "lib/optim/adamwprune.py")
    if settings.amsgrad and base_name != "adamw":
        raise ConfigError(f"ADAMWPRUNE_AMSGRAD needs the adamw base; AdamWSPAM has no AMSGrad (base {base_name!r})")
    return AdamWPrune(factory(model, settings, **options), base_name)
