"""Compact optimizer state: exp_avg and exp_avg_sq only for the kept weights (CONFIG_COMPACT_STATE, P4s).

Once a tensor's mask is settled (the schedule has applied its target and will not update again),
its pruned entries' moments are zero for good, so storing them is waste: at 90 % sparsity AdamW
keeps 3.03x the weights' bytes where 1.23x would do. ``CompactState.compact_`` replaces every state
tensor shaped like the weight (exp_avg, exp_avg_sq, max_exp_avg_sq) by a 1-D tensor of its kept
entries in flat order, padded with zeros to a multiple of ``PAD``. The weight itself, its gradient
and the bit-packed mask stay as they are. No index per entry: a kept entry's place is the count of
kept entries before it, found from ``offsets`` (the count before each plane's part of each ``CHUNK``
mask bytes, lib/optim/bitmask.py's layout; 8 int64 per 256K weights) plus a walk of the mask bits.

The step updates the kept entries only, with the same arithmetic as the dense run, so a compact run
is bit-identical to the same run with dense state:
- AdamWPrune with its fused masked step (lib/optim/masked_step.py): the C kernel's compact form on
  the CPU (the rule shared with the dense kernel, built without FMA contraction), and on a GPU the
  dense Triton kernel over the gathered kept entries with an all-ones mask.
- Otherwise torch's Adam/AdamW: its own update function (fused, foreach or loop, as the group says)
  over the gathered kept entries, from the optimizer's step hooks. The gathered vectors are padded to
  ``PAD`` so every entry takes torch's vectorized lanes, as it does in the dense tensor when that
  is a multiple of ``LANES``; only such tensors are compacted this way (the others stay dense).

A mask update on compacted state first expands it (``expand_``); the trainer compacts again once
the masks settle. Checkpoints hold the compact tensors as they are; ``restore_`` rebuilds the layout
from the pruner's masks, or expands the state when the resumed run is configured without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam_update

from lib.core.errors import HarnessError
from lib.optim import bitmask

CHUNK = 32768  # mask bytes per kernel task; offsets are counted per plane per chunk
PAD = 64  # compact tensors are padded to a multiple of this, so that the gathered vectors fill whole lanes
LANES = 16  # torch's widest float32 vector (AVX-512): a dense tensor of a multiple of it has no scalar tail


@dataclass
class Layout:
    """Where a compacted weight's kept entries are: its mask, the counts before each segment, how many."""

    packed: Tensor
    offsets: Tensor  # int64, 8 * chunks: kept entries (flat order) before plane j's part of chunk c, at j*chunks+c
    kept: int

    def padded(self) -> int:
        return PAD * math.ceil(self.kept / PAD) if self.kept else PAD

    def keep(self, numel: int) -> Tensor:
        """The bool keep-mask, flat (a temporary of one byte per weight)."""
        return bitmask.unpack(self.packed, (numel,))


def layout(packed: Tensor, numel: int) -> Layout:
    """The layout of a weight of ``numel`` entries under bit-packed mask ``packed``."""
    size = packed.numel()
    if size != bitmask.packed_size(numel):
        raise ValueError(f"packed mask has {size} bytes; {numel} entries need {bitmask.packed_size(numel)}")
    chunks = max(1, math.ceil(size / CHUNK))
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device).view(8, 1)
    bits = torch.zeros(8, chunks * CHUNK, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed.view(1, -1) >> shifts, 1, out=bits[:, :size])
    if bits[:, :size].reshape(-1)[numel:].any():
        raise ValueError("the mask keeps entries past its tensor's end (bits of the last plane's padding are set)")
    counts = bits.view(8, chunks, CHUNK).sum(-1, dtype=torch.int64).reshape(-1)
    ends = counts.cumsum(0)
    return Layout(packed, (ends - counts).cpu(), int(ends[-1]))


def _state_tensors(state: dict[str, Any], numel: int) -> list[str]:
    """Keys of the per-weight tensors of ``state`` (exp_avg, exp_avg_sq, max_exp_avg_sq; not 'step')."""
    return [k for k, v in state.items() if k != "step" and isinstance(v, Tensor) and v.dim() > 0
            and v.numel() == numel]


def is_compact(param: Tensor, state: dict[str, Any]) -> bool:
    """True when ``state`` (of ``param``) holds compacted moments."""
    value = state.get("exp_avg")
    return isinstance(value, Tensor) and value.shape != param.shape


def _torch_adam(optimizer: Any) -> bool:
    return isinstance(optimizer, torch.optim.Adam) or type(optimizer) is torch.optim.AdamW


class CompactState:
    """The compacted weights of ``optimizer`` (the one the trainer steps) and the step that updates them."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.stepper: torch.optim.Optimizer = getattr(optimizer, "base", optimizer)  # AdamWPrune's base steps
        self.layouts: dict[Tensor, Layout] = {}
        self.settled = False  # compact_ ran on settled masks (some weights may have stayed dense); expand_ resets it
        self.held: dict[Tensor, Tensor] = {}
        self.stepper.register_step_pre_hook(lambda *_: self._hold())
        self.stepper.register_step_post_hook(lambda *_: self._step_held())
        optimizer.compact = self  # type: ignore[attr-defined]  # masked_step and the pruners find it here

    # -- which weights ----------------------------------------------------------------------------

    def why_not(self, param: Tensor) -> str:
        """Empty when ``param``'s state can be compacted here, else why it stays dense (one phrase)."""
        state = self.optimizer.state.get(param, {})
        if "exp_avg" not in state:
            return "it has no Adam moments yet"
        if not param.is_contiguous():
            return "it is not contiguous"
        takes = getattr(self.optimizer, "fused_kernel_takes", None)  # AdamWPrune's (masked_step imports this module)
        if getattr(self.optimizer, "fused", False) and takes is not None and takes(param):
            return ""
        if not _torch_adam(self.stepper):
            return f"{type(self.stepper).__name__} has no compact step without the fused masked step"
        if param.numel() % LANES:
            return f"its {param.numel()} entries are not a multiple of {LANES}"
        return ""

    # -- dense <-> compact ------------------------------------------------------------------------

    @torch.no_grad()
    def compact_(self, masks: Mapping[Tensor, Tensor]) -> dict[Tensor, str]:
        """Compact the state of every weight in ``masks`` (param -> packed keep-mask) that can be; returns the ones
        left dense with the reason."""
        dense: dict[Tensor, str] = {}
        for param, packed in masks.items():
            if param in self.layouts:
                continue
            why = self.why_not(param)
            if why:
                dense[param] = why
                continue
            where = layout(packed, param.numel())
            keep = where.keep(param.numel())
            state = self.optimizer.state[param]
            for key in _state_tensors(state, param.numel()):
                state[key] = _padded(state[key].reshape(-1)[keep], where.padded())
            self.layouts[param] = where
        self.settled = True
        return dense

    @torch.no_grad()
    def expand_(self) -> None:
        """Every compacted weight's state back to dense (before a mask update changes what is kept)."""
        for param, where in list(self.layouts.items()):
            expand_state_(param, self.optimizer.state[param], where)
        self.layouts.clear()
        self.settled = False

    def buffer_bytes(self) -> int:
        """Bytes the compact form adds: the segment offsets (the masks are the pruner's)."""
        return sum(w.offsets.numel() * w.offsets.element_size() for w in self.layouts.values())

    # -- the step of torch's Adam/AdamW (the fused masked step calls ``kernels`` itself) -------------

    def _hold(self) -> None:
        for param in self.layouts:
            if param.grad is not None:
                self.held[param], param.grad = param.grad, None  # the base's own step skips it

    @torch.no_grad()
    def _step_held(self) -> None:
        held, self.held = self.held, {}
        group_of = {id(p): group for group in self.stepper.param_groups for p in group["params"]}
        try:
            for param, grad in held.items():
                _torch_adam_step(param, grad, self.stepper.state[param], self.layouts[param], group_of[id(param)])
        finally:
            for param, grad in held.items():
                param.grad = grad


def _padded(values: Tensor, size: int) -> Tensor:
    out = values.new_zeros(size)
    out[: values.numel()] = values
    return out


def expand_state_(param: Tensor, state: dict[str, Any], where: Layout) -> None:
    """``state``'s compacted tensors back to the shape of ``param``, zeros where pruned."""
    keep = where.keep(param.numel())
    for key, value in list(state.items()):
        if key != "step" and isinstance(value, Tensor) and value.dim() == 1 and value.numel() == where.padded():
            dense = value.new_zeros(param.numel())
            dense[keep] = value[: where.kept]
            state[key] = dense.view(param.shape)


def _torch_adam_step(param: Tensor, grad: Tensor, state: dict[str, Any], where: Layout, group: dict) -> None:
    """torch's own Adam/AdamW update (the group's implementation) of the kept entries of ``param``."""
    keep = where.keep(param.numel())
    flat = param.data.view(-1)
    values, grads = _padded(flat[keep], where.padded()), _padded(grad.reshape(-1)[keep], where.padded())
    beta1, beta2 = group["betas"]
    torch_adam_update(
        [values], [grads], [state["exp_avg"]], [state["exp_avg_sq"]],
        [state["max_exp_avg_sq"]] if group["amsgrad"] else [], [state["step"]],
        amsgrad=group["amsgrad"], has_complex=False, beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"], foreach=group["foreach"],
        capturable=group["capturable"], differentiable=group["differentiable"], fused=group["fused"],
        grad_scale=None, found_inf=None, decoupled_weight_decay=group.get("decoupled_weight_decay", False))
    flat[keep] = values[: where.kept]


def compact_of(optimizer: Any) -> CompactState | None:
    """The CompactState attached to ``optimizer``, if any."""
    return getattr(optimizer, "compact", None)


def compact_when_settled(optimizer: Any, pruner: Any, step: int) -> str:
    """Compact ``optimizer``'s state (if it has a CompactState) once ``pruner``'s masks settle; the one log line
    saying so, with the weights that stay dense and why, else ""."""
    held = compact_of(optimizer)
    if held is None or held.settled or not pruner.masks_settled():
        return ""
    before = _state_bytes(optimizer)
    dense = held.compact_(pruner.packed_masks())
    names = {param: name for name, param in pruner.params}
    stay = "".join(f"; '{names[p]}' stays dense: {why}" for p, why in dense.items())
    return (f"compact state from step {step}: the moments of {len(held.layouts)} weights hold their kept entries "
            f"only (optimizer state {before / 2**20:.2f} MiB -> {_state_bytes(optimizer) / 2**20:.2f} MiB){stay}")


def _state_bytes(optimizer: Any) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, Tensor))


def buffer_bytes(optimizer: Any) -> int:
    """Bytes the compact form of ``optimizer``'s state adds (0 without one)."""
    held = compact_of(optimizer)
    return held.buffer_bytes() if held is not None else 0


def restore_(optimizer: Any, masks: Mapping[Tensor, Tensor], names: Mapping[Tensor, str], wanted: bool) -> str:
    """After a checkpoint load: rebuild the layout of every compacted state from ``masks`` (param -> packed), or
    expand it when the run is configured without compact state (``wanted`` False). Returns a one-line note when it
    expanded, else ""; HarnessError when a compact state has no mask or holds another count than its mask keeps."""
    found: dict[Tensor, Layout] = {}
    for param, state in optimizer.state.items():
        if not is_compact(param, state):
            continue
        name = names.get(param, "?")
        if param not in masks:
            raise HarnessError(f"checkpoint: compact optimizer state of '{name}' but no pruning mask for it; the "
                               f"checkpoint's optimizer and pruner states disagree (was it edited?)")
        try:
            where = layout(masks[param], param.numel())
        except ValueError as exc:  # a damaged mask: the file, not the harness, is wrong
            raise HarnessError(f"checkpoint: the pruning mask of '{name}' is damaged ({exc})") from None
        size = state["exp_avg"].numel()
        if size != where.padded():
            raise HarnessError(f"checkpoint: compact optimizer state of '{name}' holds {size} entries but its mask "
                               f"keeps {where.kept} (padded: {where.padded()}); the optimizer and pruner disagree")
        found[param] = where
    if not found:
        return ""
    held = compact_of(optimizer)
    if wanted and held is not None:
        held.layouts.update(found)
        held.settled = True
        return ""
    for param, where in found.items():
        expand_state_(param, optimizer.state[param], where)
    return (f"resume: the checkpoint holds compact optimizer state for {len(found)} weights and this run is "
            f"configured without CONFIG_COMPACT_STATE; expanded to dense (same numbers, more memory)")
