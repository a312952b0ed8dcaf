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
CPU_MICRO_BATCH_CAP = {"lenet5": 512, "resnet18": 64, "resnet50": 32, "gpt2": 8}
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
    bf16: bool = False  # the GPU computes in bfloat16 (NVIDIA Ampere and newer)


def detect() -> Devices:
    """Ask torch what devices this process can use."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        return Devices("cuda", name, torch.cuda.device_count(), total, free, cores, torch.cuda.is_bf16_supported())
    return Devices("cpu", "cpu", 1, cpu_cores=cores)


# GPUs where torch.compile is known to break (ALGORITHMS.md, "Hardware plan").
COMPILE_BROKEN = ("W7900", "MI210")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def plan(model: str, batch_size: int, device: str, cpu_threads: int, jobs: int,
         devices: Devices | None = None, compile: str = "auto", dtype: str = "auto") -> HardwarePlan:
    """The plan for one run; ``device``, ``compile`` and ``dtype`` are the Kconfig choices (auto, ...)."""
    devices = devices or detect()
    if device == "cuda" and devices.kind != "cuda":
        raise HarnessError("CONFIG_DEVICE_CUDA is set but torch sees no CUDA GPU; choose DEVICE_AUTO or DEVICE_CPU")
    on_gpu = devices.kind == "cuda" and device != "cpu"
    use_compile, compile_why = _compile_choice(compile, on_gpu, devices.name)
    precision, dtype_why = _dtype_choice(dtype, on_gpu, devices.bf16)
    if on_gpu:
        micro, accum, threads = batch_size, 1, 0
        where = f"{devices.name}: whole batch {batch_size} in one micro-batch on 1 GPU"
    else:
        threads = cpu_threads or max(1, devices.cpu_cores // max(1, jobs))
        micro = largest_divisor_at_most(batch_size, CPU_MICRO_BATCH_CAP.get(model, DEFAULT_CPU_CAP))
        accum = batch_size // micro
        where = (f"CPU, {threads} thread(s) per run x {jobs} run(s) side by side; "
                 f"micro-batch {micro} x {accum} = {batch_size}")
    return HardwarePlan(device="cuda" if on_gpu else "cpu", micro_batch=micro, grad_accum=accum, world_size=1,
                        compile=use_compile, dtype=precision, threads=threads,
                        rationale=f"{where}; {compile_why}; {dtype_why}")


def _compile_choice(choice: str, on_gpu: bool, name: str) -> tuple[bool, str]:
    if choice in ("on", "off"):
        return choice == "on", f"compile {choice} (COMPILE_{choice.upper()})"
    if not on_gpu:
        return False, "compile off (auto: on a CPU the first compiled step costs more than a short run gains)"
    if any(tag in name for tag in COMPILE_BROKEN):
        return False, f"compile off (auto: known to break on {name})"
    return True, "compile on (auto: NVIDIA GPU)"


def _dtype_choice(choice: str, on_gpu: bool, bf16: bool) -> tuple[str, str]:
    if choice != "auto":
        if choice == "fp16" and not on_gpu:
            raise HarnessError("CONFIG_DTYPE_FP16 needs a GPU (fp16 autocast with a gradient scaler); "
                               "choose DTYPE_AUTO, DTYPE_BF16 or DTYPE_FP32 on the CPU")
        return DTYPES[choice], f"{choice} (DTYPE_{choice.upper()})"
    if not on_gpu:
        return "float32", "fp32 (auto: CPU)"
    return ("bfloat16", "bf16 (auto: supported)") if bf16 else ("float16", "fp16 + grad scaler (auto: no bf16)")


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (so micro x accum == n exactly)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1
