"""Device discovery and the batch / gradient-accumulation decision.

``detect()`` is the one place that asks torch about devices; tests replace it
with made-up devices. ``plan()`` turns (model, effective batch, device choice)
into a HardwarePlan whose micro-batch x grad-accum x world size equals the
effective batch exactly, with a one-line rationale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lib.errors import HarnessError
from lib.spec import HardwarePlan

# Largest micro-batch worth using on a CPU per model family: beyond it a step
# only gets slower per example (measured on 2 cores, ENVIRONMENT.md).
CPU_MICRO_BATCH_CAP = {"lenet5": 512}
DEFAULT_CPU_CAP = 64


@dataclass(frozen=True)
class Devices:
    """What the machine offers."""

    kind: str  # "cpu" or "cuda"
    name: str
    count: int
    total_bytes: int = 0
    free_bytes: int = 0
    cpu_cores: int = 1


def detect() -> Devices:
    """Ask torch what devices this process can use."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        return Devices("cuda", name, torch.cuda.device_count(), total, free, cores)
    return Devices("cpu", "cpu", 1, cpu_cores=cores)


def plan(model: str, batch_size: int, device: str, cpu_threads: int, jobs: int,
         devices: Devices | None = None) -> HardwarePlan:
    """The plan for one run; ``device`` is the DEVICE choice: auto, cpu or cuda."""
    devices = devices or detect()
    if device == "cuda" and devices.kind != "cuda":
        raise HarnessError("CONFIG_DEVICE_CUDA is set but torch sees no CUDA GPU; choose DEVICE_AUTO or DEVICE_CPU")
    use_gpu = devices.kind == "cuda" and device != "cpu"
    if use_gpu:
        return HardwarePlan(
            device="cuda", micro_batch=batch_size, grad_accum=1, world_size=1, compile=False,
            dtype="bfloat16", threads=0,
            rationale=f"{devices.name}: whole batch {batch_size} in one micro-batch, 1 GPU, bf16, no compile",
        )
    threads = cpu_threads or max(1, devices.cpu_cores // max(1, jobs))
    cap = CPU_MICRO_BATCH_CAP.get(model, DEFAULT_CPU_CAP)
    micro = largest_divisor_at_most(batch_size, cap)
    accum = batch_size // micro
    why = f"CPU, {threads} thread(s) per run x {jobs} run(s) side by side; micro-batch {micro} x {accum} = {batch_size}"
    return HardwarePlan(device="cpu", micro_batch=micro, grad_accum=accum, world_size=1, compile=False,
                        dtype="float32", threads=threads, rationale=why)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (so micro x accum == n exactly)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1
