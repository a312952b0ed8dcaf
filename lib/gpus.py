"""What the harness knows about GPU models: how to recognise them and what they can do.

``identify()`` turns the name torch reports (and the memory size, where one
name covers several) into a short key such as "B200" or "A100-40GB". Task
plug-ins key their micro-batch tables by these keys (gpt2/task.py); the plan
(lib/hardware.py) reads the compile and TF32 columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class GpuModel:
    """One row of the GPU table."""

    key: str  # what task tables are keyed by
    pattern: str  # a word of torch.cuda.get_device_name() ("NVIDIA A100-SXM4-40GB" has A100, SXM4, 40GB)
    vendor: str  # "nvidia" or "amd"
    min_gib: int = 0  # for names shared by memory sizes (A100 40 GB / 80 GB): the smallest total memory
    compile_ok: bool = True  # torch.compile is known to work (off where it is known to break)
    tf32: bool = False  # TF32 tensor-core matmuls (NVIDIA Ampere and newer)


# First match wins, so larger-memory variants of a name come first.
GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("B200", "B200", "nvidia", tf32=True),
    GpuModel("H200", "H200", "nvidia", tf32=True),
    GpuModel("H100", "H100", "nvidia", tf32=True),
    GpuModel("A100-80GB", "A100", "nvidia", min_gib=60, tf32=True),
    GpuModel("A100-40GB", "A100", "nvidia", tf32=True),
    GpuModel("L40S", "L40S", "nvidia", tf32=True),
    GpuModel("L40", "L40", "nvidia", tf32=True),
    GpuModel("A10G", "A10G", "nvidia", tf32=True),
    GpuModel("L4", "L4", "nvidia", tf32=True),
    GpuModel("MI300X", "MI300X", "amd"),
    GpuModel("MI210", "MI210", "amd", compile_ok=False),
    GpuModel("W7900", "W7900", "amd", compile_ok=False),
)


def identify(name: str, total_bytes: int) -> GpuModel | None:
    """The table row for a GPU, or None for a GPU the table does not know (the memory rule sizes it)."""
    words = set(re.split(r"[^A-Za-z0-9]+", name))
    for model in GPU_MODELS:
        if model.pattern in words and total_bytes >= model.min_gib * GIB:
            return model
    return None


def gib(n: float) -> str:
    """Bytes as GiB for rationale lines."""
    return f"{n / GIB:.1f} GiB"
