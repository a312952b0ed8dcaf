"""What the harness knows about GPU models: how to recognise them and what they can do.

``identify()`` turns the name torch reports (and the memory size, where one
name covers several) into a short key such as "B200" or "A100-40GB". Task
plug-ins key their micro-batch tables by these keys (gpt2/task.py); the plan
(lib/hardware/__init__.py) reads the compile and TF32 columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib.core.units import GIB


@dataclass(frozen=True)
class GpuModel:
    """One row of the GPU table."""

    key: str  # what task tables are keyed by
    pattern: str  # a word of torch.cuda.get_device_name() ("NVIDIA A100-SXM4-40GB" has A100, SXM4, 40GB)
    vendor: str  # "nvidia" or "amd"
    min_gib: int = 0  # for names shared by memory sizes (A100 40 GB / 80 GB): the smallest total memory
    compile_ok: bool = True  # torch.compile is known to work (off where it is known to break)
    tf32: bool = False  # TF32 tensor-core matmuls (NVIDIA Ampere and newer)
    peak_tflops: float = 0.0  # dense bf16/fp16 tensor peak from the vendor's datasheet (MFU's denominator)


# First match wins, so larger-memory variants of a name come first.
GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("B200", "B200", "nvidia", tf32=True, peak_tflops=2250),
    GpuModel("H200", "H200", "nvidia", tf32=True, peak_tflops=989),
    GpuModel("H100", "H100", "nvidia", tf32=True, peak_tflops=989),  # SXM; the PCIe card peaks at 756
    GpuModel("A100-80GB", "A100", "nvidia", min_gib=60, tf32=True, peak_tflops=312),
    GpuModel("A100-40GB", "A100", "nvidia", tf32=True, peak_tflops=312),
    GpuModel("L40S", "L40S", "nvidia", tf32=True, peak_tflops=362),
    GpuModel("L40", "L40", "nvidia", tf32=True, peak_tflops=181),
    # No MFU on the A10G: AWS's variant has less tensor throughput than the A10 (whose datasheet says
    # 125 bf16 TFLOPS) and we have no published figure for it; a wrong peak is worse than none.
    GpuModel("A10G", "A10G", "nvidia", tf32=True),
    GpuModel("L4", "L4", "nvidia", tf32=True, peak_tflops=121),
    GpuModel("MI300X", "MI300X", "amd", peak_tflops=1307),
    GpuModel("MI210", "MI210", "amd", compile_ok=False, peak_tflops=181),
    GpuModel("W7900", "W7900", "amd", compile_ok=False, peak_tflops=123),
)


def identify(name: str, total_bytes: int) -> GpuModel | None:
    """The table row for a GPU, or None for a GPU the table does not know (the memory rule sizes it)."""
    words = set(re.split(r"[^A-Za-z0-9]+", name))
    for model in GPU_MODELS:
        if model.pattern in words and total_bytes >= model.min_gib * GIB:
            return model
    return None



def mfu(flops_per_sample: float | None, samples_per_s: float, name: str, total_bytes: int, dtype: str,
        world_size: int) -> dict | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the GPUs' dense 16-bit peak (None if unknown).

    Only for 16-bit runs on a GPU of the table, of a task that counts its FLOPs
    (GPT-2: 6N + 12 L d T per token, PaLM appendix B).
    """
    known = identify(name, total_bytes)
    if not flops_per_sample or dtype not in ("bfloat16", "float16") or not known or not known.peak_tflops:
        return None
    peak = known.peak_tflops * 1e12 * world_size
    return {"value": samples_per_s * flops_per_sample / peak, "flops_per_sample": flops_per_sample,
            "peak_flops": peak, "gpu": known.key, "peak_source": "lib/hardware/gpus.py datasheet dense 16-bit peak"}
