"""``Pruner``: the base every pruning method extends.

The trainer drives a pruner with four calls per run::

    pruner.set_total_steps(total)          # once, resolves a fractional schedule
    loss.backward()
    pruner.before_step()                   # zero pruned weights' gradients
    clip gradients; optimizer.step()
    pruner.after_step(step)                # on schedule: score -> threshold -> masks (True if changed)

A method only overrides ``importance`` (score high = keep); methods that need
per-step work (movement pruning's score accumulation) also extend
``before_step`` and report their buffers through ``_buffers``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lib.core.errors import HarnessError
from lib.core.spec import PruneSettings
from lib.optim import bitmask, compact, kernels
from lib.optim.kernels import native
from lib.pruning import sharded
from lib.pruning.per_layer import LayerTargets, row_masks
from lib.pruning.prunable import prunable_parameters, zero_count
from lib.pruning.schedule import SparsitySchedule
from lib.pruning.sharded import is_sharded, local, sharded_exact_mask
from lib.pruning.threshold import (
    LazyScores,
    exact_count_mask,
    get_threshold,
    prune_count,
    sample_size,
    sampled_cut,
)


class Pruner:
    """Gradual pruning of the prunable weights of ``model`` along a sparsity schedule."""

    name: ClassVar[str] = "base"
    # Store keep-masks bit-packed (lib/optim/bitmask.py, 1 bit per weight) instead of bool (1 byte).
    pack_masks: ClassVar[bool] = False
    # Masks whole structures (heads, neurons, channels, units, blocks): its reach depends on the model's
    # structures, and surgery cuts exactly what its masks removed.
    whole_structures: ClassVar[bool] = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: PruneSettings):
        self.model = model
        self.optimizer = optimizer
        self.settings = settings
        self.params = self.select_params(model)
        self.sharded = any(is_sharded(p) for _, p in self.params)  # FSDP2: masks and scores are this rank's shard
        self.unresolved = self.make_schedule(settings)  # kept: a time budget re-sizes the run later
        self.schedule = self.unresolved
        self.threshold = get_threshold(settings.threshold, settings.sample_tolerance)
        self.masks: dict[str, Tensor] = {}  # name -> keep-mask (bool, or packed uint8); empty until the first update
        self.step = 0  # optimizer steps completed at the last after_step()
        self.applied = 0.0  # sparsity the current masks were computed for
        self.removed = 0  # prunable weights checkpoint-time surgery removed from the model (lib/surgery/cut.py)
        self.total_steps: int | None = None
        self.layered = LayerTargets(settings, self.params)  # CONFIG_SPARSITY_DISTRIBUTION's per-layer counts

    # -- what subclasses override -------------------------------------------------------------

    def select_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The weights this method may prune: every prunable weight (lib/pruning/prunable.py)."""
        return prunable_parameters(model)

    def make_schedule(self, settings: PruneSettings) -> SparsitySchedule:
        """The schedule this method follows (validated here, so a bad config fails before training)."""
        return SparsitySchedule(
            settings.schedule, settings.target, settings.start, settings.end, settings.frequency
        )

    def importance(self, name: str, param: nn.Parameter) -> Tensor:
        """Score of each entry of ``param``, same shape; the lowest are pruned."""
        raise NotImplementedError(f"{type(self).__name__} must define importance()")

    def importance_at(self, name: str, param: nn.Parameter, index: Tensor) -> Tensor:
        """``importance(name, param)`` at the flattened positions ``index`` (override to skip the rest)."""
        return self.importance(name, param).reshape(-1)[index]

    def ranked(self, i: int) -> Tensor:
        """Importance of prunable tensor ``i`` with every exactly-zero weight ranked lowest (-inf).

        Masks only grow: a pruned weight (exactly zero) gets no gradient, so "reviving"
        it would leave a zero counted as kept and the reached sparsity would overshoot;
        scores where pruned weights score 0 (movement, bitter5) would otherwise do just
        that. Testing w == 0 rather than the mask needs no unpacking of packed masks,
        and a kept weight stuck at zero is pruned first, so the masks agree with the
        sparsity measured on the weights.
        """
        name, param = self.params[i]
        return local(self.importance(name, param)).masked_fill(local(param) == 0, float("-inf"))

    def ranked_at(self, i: int, index: Tensor) -> Tensor:
        """``ranked(i)`` at the flattened positions ``index``."""
        name, param = self.params[i]
        scores = self.importance_at(name, param, index)
        return scores.masked_fill(param.detach().reshape(-1)[index] == 0, float("-inf"))

    def _buffers(self) -> Iterable[Tensor]:
        """Tensors the pruner keeps alive between steps (counted by ``buffer_bytes``)."""
        return self.masks.values()

    def close(self) -> None:
        """Release what the pruner attached to the model (hooks); masks and weights stay."""

    # -- the trainer's interface --------------------------------------------------------------

    def set_total_steps(self, total: int) -> None:
        """Tell the pruner how long the run is, turning fractional start/end into steps.

        May be called again (a time budget fixes the step count after a few measured
        steps): fractions are always resolved from the configured schedule, never
        from an earlier resolution.
        """
        self.total_steps = total
        self.schedule = self.unresolved.resolve(total)

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradients of pruned weights; call after backward, before clipping and step.

        With a zero gradient, a pruned weight and its zeroed optimizer state stay
        exactly zero under SGD (momentum, L2), Adam and AdamW, so no other
        per-step work is needed between mask updates.
        """
        for name, param in self.params:
            mask = self.masks.get(name)
            if mask is not None and param.grad is not None:
                _apply_mask(local(param.grad), mask)

    def after_step(self, step: int) -> bool:
        """Record that ``step`` optimizer steps (1-based) are done; update masks when the schedule says so.

        Returns True when the masks changed (the trainer then broadcasts rank 0's masks).
        """
        self.step = step
        if not self._due(step):
            return False
        held = compact.compact_of(self.optimizer)
        if held is not None:
            held.expand_()  # the update decides and zeroes on dense state; the trainer compacts again once settled
        self.prune_to(self.scheduled_sparsity(step))
        return True

    def masks_settled(self) -> bool:
        """True once the schedule has applied its target and will not update the masks again: what compact
        optimizer state waits for (lib/optim/compact.py)."""
        if self.total_steps is None or not self.masks:
            return False
        return self.step >= self.schedule.steps()[1] and self.applied == self.schedule.target

    def packed_masks(self) -> dict[nn.Parameter, Tensor]:
        """Each masked weight's keep-mask bit-packed (the stored tensor itself when packed, else a packed copy)."""
        out = {}
        for name, param in self.params:
            mask = self.masks.get(name)
            if mask is not None:
                out[param] = mask if mask.dtype == torch.uint8 else bitmask.pack(mask)
        return out

    def _due(self, step: int) -> bool:
        if self.schedule.should_update(step):
            return True
        # Apply the final target at the first step past end even when step == end
        # was never seen (end == 0, as steps are 1-based, or a resume that skipped it).
        return step >= self.schedule.steps()[1] and self.applied != self.schedule.target

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Recompute the masks for ``sparsity`` and zero pruned weights and their optimizer state.

        Scores are computed one tensor at a time as the threshold reads them
        (``LazyScores``), never all at once; the update step seeds ``sampled``.
        """
        packed = self.one_pass_masks(sparsity)
        if packed is not None:
            self.masks, self.applied = packed, sparsity
            return
        if (per_layer := self.layer_masks(sparsity)) is not None:  # CONFIG_SPARSITY_DISTRIBUTION
            masks = per_layer
        elif self.sharded:  # the exact global threshold agreed over the ranks' shards
            masks = sharded_exact_mask(self._lazy_scores(), sparsity, self.prunable_count())
        else:
            masks = self.threshold(self._lazy_scores(), sparsity, seed=self.step)
        self.masks = {name: self._stored(mask) for (name, _), mask in zip(self.params, masks, strict=True)}
        self.applied = sparsity
        self.apply_masks()

    def layer_masks(self, sparsity: float) -> list[Tensor] | None:
        """Each layer pruned to its own count under the distribution (lib/pruning/distribution.py), or each
        output row when the metric compares within rows (Wanda); None for ``global``, where one threshold over
        every layer decides."""
        if self.compares_rows() and self.params:
            return row_masks(self.ranked, self.params, sparsity)
        if self.settings.distribution == "global" or not self.params:
            return None
        kept = self.layered.kept(self.model, self.params, sparsity)
        return [exact_count_mask([self.ranked(i)], p.numel() - k)[0]
                for i, ((_, p), k) in enumerate(zip(self.params, kept, strict=True))]

    def compares_rows(self) -> bool:
        """True when weights compete only within their output row (the importance metric says so)."""
        return False

    def _lazy_scores(self) -> LazyScores:
        return LazyScores(self.ranked, [local(p).numel() for _, p in self.params], gather=self.ranked_at,
                          device=self.params[0][1].device if self.params else None)

    def weight_is_score(self) -> bool:
        """True when the importance is ``|w|`` itself, which the one-pass update computes on the fly."""
        return False

    @torch.no_grad()
    def one_pass_masks(self, sparsity: float) -> dict[str, Tensor] | None:
        """Packed masks made in one pass per tensor, pruned weights and their state zeroed on the way.

        Each tensor's score is computed once (never for ``|w|``) and read once with the
        weight and its optimizer state: compare with the sampled cut, pack the keep bits,
        zero what is pruned (lib/kernels). None where this path does not apply: another
        threshold, bool masks, a cut tied in the sample, or tensors the kernel cannot take.
        """
        if self.settings.threshold != "sampled" or not self.pack_masks or not self.params:
            return None
        if not native.fits(*[t for _, p in self.params for t in (p, *self._state_tensors(p))]):
            return None
        total = self.prunable_count()
        if prune_count(total, sparsity) in (0, total):
            return None
        size = sample_size(sparsity, self.settings.sample_tolerance)
        cut, tied = sampled_cut(self._lazy_scores(), sparsity, size=size, seed=self.step)
        if tied and cut != float("-inf"):
            return None  # a mass of equal scores at the cut: the two-pass path prunes it to the exact count
        # A cut inside the mass of zero weights (ranked -inf): the target is already reached within the
        # sampling error, and score > -inf and w != 0 prunes exactly the zeros, so none is revived.
        masks = {}
        for name, param in self.params:
            score = None if self.weight_is_score() else self.importance(name, param).detach()
            if score is not None:
                score = score.to(torch.float32).contiguous()
            masks[name] = torch.empty(bitmask.packed_size(param.numel()), dtype=torch.uint8)
            kernels.mask_update_(param.data, cut, masks[name], self._state_tensors(param), score)
        return masks

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero pruned weights and every optimizer state tensor shaped like them."""
        for name, param in self.params:
            mask = self.masks.get(name)
            if mask is None:
                continue
            _apply_mask(local(param), mask)
            for value in self._state_tensors(param):
                _apply_mask(local(value), mask)

    def mask(self, name: str) -> Tensor | None:
        """The bool keep-mask of weight ``name`` (unpacked if stored packed); None before the first update."""
        mask = self.masks.get(name)
        if mask is None or mask.dtype == torch.bool:
            return mask
        return bitmask.unpack(mask, local(dict(self.params)[name]).shape)

    def _stored(self, mask: Tensor, shape: torch.Size | None = None) -> Tensor:
        """A bool or packed keep-mask in the form this pruner stores (``pack_masks``)."""
        if mask.dtype == torch.uint8 and not self.pack_masks:
            assert shape is not None
            return bitmask.unpack(mask, shape)
        if mask.dtype != torch.uint8 and self.pack_masks:
            return bitmask.pack(mask.to(torch.bool))
        return mask if mask.dtype == torch.uint8 else mask.to(torch.bool)

    def _state_tensors(self, param: nn.Parameter) -> list[Tensor]:
        """Per-weight optimizer state (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer, ...)."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        # Scalars such as Adam's 'step' have a different shape and are left alone.
        return [v for v in state.values() if isinstance(v, Tensor) and v.shape == param.shape]

    def scheduled_sparsity(self, step: int) -> float:
        """Sparsity the schedule asks for after ``step`` optimizer steps."""
        return self.schedule.sparsity_at(step)

    def masks_final(self) -> bool:
        """Whether the masks are the ones the target asks for, which a best checkpoint needs beside the
        sparsity (lib/train/trainer.py); any within the sparsity tolerance, unless a method says otherwise."""
        return True

    def reaches_target(self) -> bool:
        """False when the run ends before the schedule applies its target (the trainer flags it)."""
        if self.total_steps is None:
            raise RuntimeError("call set_total_steps() before reaches_target()")
        return self.schedule.reaches_target(self.total_steps)

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of prunable weights that are exactly zero, measured on the weights themselves.

        Measured rather than read from the masks, so a mask that was never
        applied (or an optimizer that revived pruned weights) shows up.
        """
        total = self.prunable_count() + self.removed  # weights surgery removed count as pruned
        if total == 0:
            return 0.0
        zeros = sharded.zero_count([local(p) for _, p in self.params]) if self.sharded else zero_count(self.params)
        return (zeros + self.removed) / total

    def report(self) -> dict[str, Any]:
        """Method-specific facts for summary.json's sparsity entry (structures removed, ...)."""
        return {}

    def layer_report(self) -> dict[str, Any]:
        """Per-layer targets and reached sparsities under a per-layer distribution (summary.json); {} for global."""
        if self.settings.distribution == "global" or not self.params or self.total_steps is None:
            return {}
        return self.layered.report(self.params, self.schedule.target)

    def prunable_count(self) -> int:
        """Number of weights this pruner may prune."""
        return sum(param.numel() for _, param in self.params)

    def buffer_bytes(self) -> int:
        """Bytes the pruner holds between steps: masks plus any method buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks and progress, for a checkpoint (plain tensors and numbers: weights_only-safe)."""
        return {"step": self.step, "applied": self.applied, "masks": dict(self.masks), "removed": self.removed,
                **self.layered.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; the masks must match this model's prunable weights."""
        params = dict(self.params)
        masks = state.get("masks", {})
        for name, mask in masks.items():
            if name not in params or not _fits(mask, local(params[name])):
                raise HarnessError(
                    f"checkpoint pruning mask '{name}' does not match the model; "
                    "was the checkpoint saved by another model?"
                )
        self.masks = {
            name: self._stored(mask.to(device=params[name].device), local(params[name]).shape)
            for name, mask in masks.items()
        }
        self.step = int(state["step"])
        self.applied = float(state["applied"])
        self.removed = int(state.get("removed", 0))
        self.layered.load_state_dict(state)


def _apply_mask(tensor: Tensor, mask: Tensor) -> None:
    """Zero, in place, the entries of ``tensor`` that ``mask`` (bool or packed) prunes."""
    if mask.dtype == torch.bool:
        tensor.mul_(mask)
    else:
        bitmask.apply_(tensor, mask)


def _fits(mask: Tensor, param: Tensor) -> bool:
    """True when ``mask`` is a bool mask shaped like ``param`` or a packed one of the right size."""
    if mask.dtype == torch.uint8:
        return mask.shape == (bitmask.packed_size(param.numel()),)
    return mask.shape == param.shape
