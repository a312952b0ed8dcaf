"""Part 5: activation checkpointing on the device. For each policy (none, uniform, sqrt, selective,
budget) the bytes one forward leaves saved for backward, measured on CUDA, against the harness's
estimate of them (lib/hardware/actckpt.py), with the step's CUDA peak (scripts/bench_activation_ckpt.py)."""

from __future__ import annotations

from gpucheck import Context, result
from lib.core.units import mib

GPU_WORKLOADS = ("GPT-2 124M (4x128 tokens)", "ResNet-18 (32x 32x32)")
DRY_WORKLOADS = ("tiny GPT (8x64 tokens)",)


def run(ctx: Context) -> dict:
    import bench_activation_ckpt as bench
    import torch

    device = torch.device(ctx.device)
    builders = bench.workloads(device)
    found, rows = {}, []
    for name in DRY_WORKLOADS if ctx.dry else GPU_WORKLOADS:
        measured = bench.measure(builders[name], device, 1 if ctx.dry else 3)
        for row in measured:
            row["measured_over_estimate"] = (row["measured_bytes"] / row["estimated_bytes"]
                                             if row["measured_bytes"] and row["estimated_bytes"] else None)
        found[name] = measured
        for row in measured:
            ratio = row["measured_over_estimate"]
            peak = row["cuda_peak_bytes"]
            rows.append([f"{name}, {row['policy']}",
                         f"measured {_mib(row['measured_bytes'])} vs estimated {_mib(row['estimated_bytes'])} "
                         f"({f'{ratio:.2f}x' if ratio else 'n/a'}); memory {_x(row['memory_ratio'])} and time "
                         f"{_x(row['time_ratio'])} of none; step peak {_mib(peak) if peak else 'n/a (CPU)'}"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result("ok", "", found, rows)


def _mib(x: float | None) -> str:
    return mib(x) if x else "n/a"


def _x(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "n/a"
