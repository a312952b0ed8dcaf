"""The batch plan: micro-batch and gradient accumulation, and the activation checkpointing decided with
them, by the rules in order (docs/algorithms.md, "Hardware plan"): manual settings; on a GPU the task's
table by GPU model, checked against free memory, else the free-memory rule; on a CPU the task's CPU cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lib.core.errors import ConfigError, HarnessError
from lib.core.spec import RunSpec
from lib.core.units import gib
from lib.hardware.gpus import identify
from lib.hardware.memory import Footprint
from lib.hardware.plan_actckpt import ActCkptPlanner, Decision

if TYPE_CHECKING:  # the device and settings types live with detection, which imports this module
    from lib.hardware import Devices, Gpu, HardwareSettings


class DoesNotFit(HarnessError):
    """The model does not fit one rank's memory (``usable`` bytes) at micro-batch 1."""

    def __init__(self, message: str, usable: int) -> None:
        super().__init__(message)
        self.usable = usable


@dataclass(frozen=True)
class Recompute:
    """The activation checkpointing decision: policy, block interval, and the rationale's words for an auto one."""

    policy: str
    every: int
    why: str = ""


def batch_and_recompute(spec: RunSpec, settings: HardwareSettings, task: Any, ckpt: ActCkptPlanner,
                         devices: Devices, room: Room | None, world: int,
                         per_rank: int) -> tuple[int, int, str, Recompute]:
    """(micro-batch, accumulation, how they were sized, activation checkpointing), each decided once: by the
    settings (BATCH_PLAN_MANUAL), the GPU memory rule, or the CPU rule."""
    auto = settings.act_ckpt == "auto"
    if settings.batch_plan == "manual":
        micro, accum, sizing = _manual(settings, world, spec.train.batch_size)
        if room is None:
            return micro, accum, sizing, _off_gpu(settings)
        decision = ckpt.for_gpu(room.usable, micro) if auto else None
        recompute = (Recompute(decision.policy, decision.every, decision.why) if decision
                     else Recompute(settings.act_ckpt, settings.act_ckpt_every))
        note = _manual_memory_note(ckpt.footprint(recompute.policy, recompute.every), room, micro)
        return micro, accum, sizing + note, recompute
    if room is None:
        cap = task.cpu_micro_batch(spec)
        micro, accum = _closest(per_rank, cap)
        return micro, accum, f"CPU rule: micro-batch at most {cap} for {spec.model}", _off_gpu(settings)
    known, table = _gpu_table(task, spec, devices)
    decision = ckpt.for_gpu(room.usable, min(per_rank, table or per_rank))
    micro, accum, sizing = _gpu_rule(spec, room, per_rank, decision, known, table, not devices.homogeneous)
    return micro, accum, sizing, Recompute(decision.policy, decision.every, decision.why if auto else "")


def _off_gpu(settings: HardwareSettings) -> Recompute:
    """Without GPU memory to fit, the micro-batch is sized for speed: auto means no checkpointing."""
    if settings.act_ckpt == "auto":
        return Recompute("none", settings.act_ckpt_every, "activation checkpointing auto -> none: on the CPU the "
                                                           "micro-batch is sized for speed, not memory")
    return Recompute(settings.act_ckpt, settings.act_ckpt_every)


def share_per_rank(target: int, world: int) -> int:
    """Examples per rank per step. Ranks take equal shares, so a target not divisible by the
    world size is rounded down in auto mode (the rationale says by how much)."""
    if target < world:
        raise HarnessError(f"effective batch CONFIG_BATCH_SIZE={target} is smaller than the {world} ranks; "
                           f"every rank needs at least one example: raise it to a multiple of {world}")
    return target // world


def _manual(settings: HardwareSettings, world: int, target: int) -> tuple[int, int, str]:
    micro, accum = settings.micro_batch, settings.grad_accum
    for symbol, value in (("MICRO_BATCH", micro), ("GRAD_ACCUM", accum)):
        if value < 1:
            raise ConfigError(f"CONFIG_{symbol}={value}: a manual {symbol.lower().replace('_', ' ')} must be "
                              f"at least 1; set it, or choose CONFIG_BATCH_PLAN_AUTO")
    if micro * accum * world != target:
        fix = (f"set CONFIG_GRAD_ACCUM={target // (micro * world)}" if target % (micro * world) == 0
               else f"choose a micro-batch that divides {target // world}" if target % world == 0
               else f"make CONFIG_BATCH_SIZE a multiple of the {world} ranks")
        raise ConfigError(f"CONFIG_MICRO_BATCH={micro} x CONFIG_GRAD_ACCUM={accum} x {world} rank(s) = "
                          f"{micro * accum * world}, not the effective batch CONFIG_BATCH_SIZE={target}; {fix}")
    return micro, accum, "manual (CONFIG_BATCH_PLAN_MANUAL)"


@dataclass(frozen=True)
class Room:
    """The memory one run's rank may use on the tightest GPU: free memory less the margin, shared
    with the other runs' ranks that MATRIX_JOBS puts on the same GPU."""

    gpu: Gpu
    usable: int
    text: str

    @classmethod
    def of(cls, devices: Devices, margin: float, processes: int) -> Room:
        gpu = min(devices.gpus, key=lambda g: g.free_bytes)  # mixed or busy GPUs: size for the tightest
        share = max(1, -(-processes // devices.count))  # processes per GPU, rounded up
        usable = int(gpu.free_bytes * (1 - margin) / share)
        shared = f", shared by {share} runs side by side" if share > 1 else ""
        return cls(gpu, usable, f"{gib(usable)} usable of {gib(gpu.free_bytes)} free{shared}")


def _gpu_table(task: Any, spec: RunSpec, devices: Devices) -> tuple[Any, int | None]:
    """The GPU model (lib/hardware/gpus.py) when every GPU is the same one, and the task's micro-batch for it."""
    gpu = min(devices.gpus, key=lambda g: g.free_bytes)
    known = identify(gpu.name, gpu.total_bytes) if devices.homogeneous else None
    return known, task.gpu_micro_batch(spec, known.key) if known else None


def _gpu_rule(spec: RunSpec, room: Room, per_rank: int, decision: Decision, known: Any,
              table: int | None, mixed: bool) -> tuple[int, int, str]:
    """The task's table for this GPU model if it fits in free memory, else the free-memory rule; the
    footprint is the one under the activation checkpointing decision."""
    footprint = decision.footprint
    fits = footprint.fits(room.usable)
    if decision.cap:
        fits = min(fits, decision.cap)
    estimate = f"estimated {gib(footprint.fixed)} + {gib(footprint.per_sample)}/sample"
    if decision.policy != "none":
        estimate += f" with activation checkpointing {decision.policy}"
    if table and footprint.at(table) <= room.usable and not (decision.cap and table > decision.cap):
        cap, why = table, f"GPU table: {known.key} -> micro-batch {table} ({estimate} fits {room.text})"
    else:
        if fits < 1:
            raise DoesNotFit(f"{spec.model} does not fit on {room.gpu.name}: about {gib(footprint.at(1))} at "
                             f"micro-batch 1 but {room.text}; free GPU memory, lower CONFIG_GPU_MEMORY_MARGIN "
                             f"or CONFIG_MATRIX_JOBS, choose ACTIVATION_CKPT_AUTO, or choose a smaller model",
                             room.usable)
        cap = fits
        why = (f"GPU table says {table} for {known.key} but {room.text}: " if table else
               "mixed GPUs: " if mixed else "")
        why += f"memory rule ({estimate}, {room.text}) -> at most {fits}"
        if decision.why and decision.cap:
            why += f" ({decision.why})"
    micro, accum = _closest(per_rank, cap)
    return micro, accum, why


def _manual_memory_note(footprint: Footprint, room: Room, micro: int) -> str:
    need = footprint.at(micro)
    if need <= room.usable:
        return ""
    return (f"; WARNING: micro-batch {micro} is estimated at {gib(need)} > {room.text}: "
            f"expect out-of-memory unless CONFIG_PROBE_BATCH is on")


def _closest(per_rank: int, cap: int) -> tuple[int, int]:
    """(micro, accum) with micro <= cap and micro x accum == per_rank exactly when a divisor of
    per_rank lies in (cap/2, cap]; otherwise micro = cap and accum rounded, so a prime batch does
    not force micro-batch 1 (the rationale reports the difference)."""
    cap = max(1, min(cap, per_rank))
    exact = largest_divisor_at_most(per_rank, cap)
    if 2 * exact > cap:
        return exact, per_rank // exact
    return cap, max(1, round(per_rank / cap))


def shortfall(effective: int, target: int) -> str:
    if effective == target:
        return " = target"
    return (f", NOT the target {target} ({effective - target:+d}, {100 * (effective - target) / target:+.1f} %): "
            f"no exact split across ranks and micro-batches")


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (so micro x accum == n exactly)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1
