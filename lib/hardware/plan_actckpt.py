"""The hardware plan's activation-checkpointing decision (lib/hardware/actckpt.py does the checkpointing).

The plan sizes the micro-batch from an estimate of one step's memory (lib/hardware/memory.py); a
checkpointing policy changes that estimate. This module gives the plan the estimate under
the configured policy and, for ``auto``, picks a policy: none when the target micro-batch
fits without, else the cheapest policy (least recomputation) under which it fits:
selective (pointwise ops only), then uniform every 2nd block, then sqrt (every block
recomputed once). The rationale names the estimates both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lib.core.errors import ConfigError
from lib.core.units import gib
from lib.hardware import actckpt, memory
from lib.hardware.actckpt import Segment
from lib.hardware.memory import Footprint

# auto's candidates, least recomputation first
AUTO_ORDER = (("selective", 2), ("uniform", 2), ("sqrt", 2))
# FSDP2 gathers each block's weights in the block's own forward, so a checkpointed segment may hold one block only
SHARDED_ORDER = AUTO_ORDER[:2]


@dataclass(frozen=True)
class Decision:
    """A policy and, on a GPU, the footprint the memory rule sizes the micro-batch with."""

    policy: str
    every: int
    footprint: Footprint | None
    why: str  # "" when nothing needs saying (none, not asked for)
    cap: int = 0  # the largest micro-batch the policy allows (budget); 0: no limit


class ActCkptPlanner:
    """Activation checkpointing for one run's plan: ``settings`` are lib.hardware.HardwareSettings."""

    def __init__(self, settings: Any, task: Any, spec: Any, precision: str, shards: int = 1) -> None:
        self.settings, self.task, self.spec, self.precision = settings, task, spec, precision
        self.shards = shards  # ranks the weights and their state are sharded over (FSDP2); 1: replicated
        self.n = len(self._meta_blocks()) if settings.act_ckpt != "none" else 0
        if settings.act_ckpt == "budget" and settings.act_budget_mb < 1:
            raise ConfigError(f"CONFIG_ACTIVATION_BUDGET_MB={settings.act_budget_mb}: the budget policy needs a "
                              f"budget of at least 1 MiB; set it, or choose another ACTIVATION_CKPT policy")

    def _meta_blocks(self) -> list:
        import torch

        with torch.device("meta"):
            return self.task.blocks(self.task.build_model(self.spec))

    def footprint(self, policy: str, every: int = 2) -> Footprint:
        """The step estimate with ``policy`` (budget: every block checkpointed, its smallest)."""
        if policy == "budget":
            policy, every = "uniform", 1
        segments = actckpt.choose(policy, self.n, every=every) if policy != "none" else []
        return memory.estimate_footprint(self.task, self.spec, self.precision, segments, self.shards)

    def for_gpu(self, usable: int, target: int) -> Decision:
        """The policy and footprint for the GPU memory rule, ``target`` the micro-batch it aims for."""
        policy, every = self.settings.act_ckpt, self.settings.act_ckpt_every
        if policy != "auto":
            if policy == "budget":  # every block checkpointed at most, and the budget caps the micro-batch
                cap = self._budget_cap()
                return Decision(policy, every, self.footprint(policy), f"budget policy: micro-batch at most {cap}",
                                cap)
            return Decision(policy, every, self.footprint(policy, every), "")
        plain = self.footprint("none")
        if plain.at(target) <= usable:
            return Decision("none", 2, plain, f"activation checkpointing auto -> none: micro-batch {target} is "
                                              f"estimated at {gib(plain.at(target))} without, {gib(usable)} usable")
        self.n = len(self._meta_blocks())
        if self.n == 0:
            return Decision("none", 2, plain, "activation checkpointing auto -> none: the model has no blocks")
        order = AUTO_ORDER if self.shards == 1 else SHARDED_ORDER
        options = [(name, every, self.footprint(name, every)) for name, every in order]
        fitting = [o for o in options if o[2].at(target) <= usable]
        best = fitting[0] if fitting else max(options, key=lambda o: o[2].fits(usable))
        if not fitting and best[2].fits(usable) < 2 * max(1, plain.fits(usable)):
            return Decision("none", 2, plain, f"activation checkpointing auto -> none: micro-batch {target} fits "
                                              f"under no policy, and {best[0]} (at most {best[2].fits(usable)}) "
                                              f"would not double the {plain.fits(usable)} that fit without")
        name, every, footprint = best
        aim = target if fitting else footprint.fits(usable)
        return Decision(name, every, footprint,
                        f"activation checkpointing auto -> {name}: micro-batch {aim} is estimated at "
                        f"{gib(plain.at(aim))} without checkpointing and {gib(footprint.at(aim))} with {name} "
                        f"({gib(usable)} usable)")

    def _budget_cap(self) -> int:
        """The largest micro-batch at which the budget covers checkpointing every block."""
        budget = self.settings.act_budget_mb * 2**20
        every_block = [Segment(i, i) for i in range(self.n)]
        profiles = memory.activation_profiles(self.task, self.spec)
        one, two = (actckpt.peak_saved(every_block, p) for p in profiles.at_one_two)
        return max(1, int((budget - one) // max(1, two - one)) + 1)

    def segments(self, policy: str, every: int, micro: int, auto: bool = False) -> tuple[list[Segment], str]:
        """The segments at the planned micro-batch (budget needs it) and their rationale part; ``auto``:
        the policy was chosen by ACTIVATION_CKPT_AUTO."""
        if policy in ("none", "auto"):
            return [], ""
        profile = memory.activation_profiles(self.task, self.spec).at(micro) if policy == "budget" else None
        segments = actckpt.choose(policy, self.n, every=every, budget=self.settings.act_budget_mb * 2**20,
                                  profile=profile)
        symbol = "ACTIVATION_CKPT_AUTO" if auto else f"ACTIVATION_CKPT_{policy.upper()}"
        words = f"activation checkpointing {policy} ({symbol}): " + actckpt.describe(segments, self.n)
        if profile is not None:
            words += (f", estimated {gib(actckpt.peak_saved(segments, profile))} of activations at micro-batch "
                      f"{micro} (budget {self.settings.act_budget_mb} MiB, {gib(actckpt.peak_saved([], profile))} "
                      f"without)")
        return segments, words


def record(task: Any, spec: Any, hw: Any, measured: int | None) -> dict[str, Any]:
    """summary.json's activations entry: the policy, its segments, the bytes one forward left saved for
    backward (measured in the run's second step; None if it had fewer) and the plan's estimates of them
    with and without the policy, at the micro-batch the run used."""
    entry: dict[str, Any] = {"policy": hw.act_ckpt, "segments": [list(s) for s in hw.act_ckpt_segments],
                             "measured_bytes": measured if measured and measured > 0 else None,
                             "measured_at": f"forward of micro-batch {hw.micro_batch}, {hw.device}"}
    if hw.act_ckpt_segments:
        profile = memory.activation_profiles(task, spec).at(hw.micro_batch)
        segments = [Segment(*s) for s in hw.act_ckpt_segments]
        entry["estimated_bytes"] = actckpt.forward_saved(segments, profile)
        entry["estimated_bytes_without"] = actckpt.forward_saved([], profile)
    return entry
