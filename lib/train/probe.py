"""Probe mode (CONFIG_PROBE_BATCH): find a micro-batch that fits before training starts.

One forward/backward at the planned micro-batch, with the optimizer state's
bytes held in reserve (the first optimizer step allocates them); on
out-of-memory, halve (to a divisor of the per-rank batch, so the effective
batch stays exact) and try again. Every rank probes; all take the smallest
micro-batch that fitted anywhere. What was tried is recorded in summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lib.core.errors import HarnessError
from lib.core.spec import HardwarePlan, RunSpec
from lib.core.task import Task
from lib.hardware.batch import largest_divisor_at_most
from lib.hardware.memory import OPTIMIZER_STATE_BYTES_PER_WEIGHT
from lib.train import distributed


def fit_micro_batch(task: Task, model: nn.Module, spec: RunSpec, device: torch.device,
                    autocast: Callable[[], Any]) -> tuple[HardwarePlan, list[dict[str, Any]]]:
    """The plan with the micro-batch that fits (grad-accum recomputed) and the list of attempts."""
    hw = spec.hardware
    per_rank = hw.micro_batch * hw.grad_accum
    micro, tries = hw.micro_batch, []
    while True:
        fits = _fits(task, model, spec, device, autocast, micro)
        tries.append({"micro_batch": micro, "fits": fits})
        if fits:
            break
        if micro == 1:
            raise HarnessError(f"{spec.model} does not fit on {device} even at micro-batch 1 (probe mode); "
                               f"free device memory or choose a smaller model")
        micro = largest_divisor_at_most(per_rank, micro // 2)
    micro = distributed.reduce_min_int(micro)
    return dataclasses.replace(hw, micro_batch=micro, grad_accum=per_rank // micro), tries


def _fits(task: Task, model: nn.Module, spec: RunSpec, device: torch.device, autocast: Callable[[], Any],
          micro: int) -> bool:
    """One forward/backward of ``micro`` examples; False on out-of-memory. Leaves no gradients behind."""
    reserve = None
    try:
        weights = sum(p.numel() for p in model.parameters())
        reserve = torch.empty(OPTIMIZER_STATE_BYTES_PER_WEIGHT * weights, dtype=torch.uint8, device=device)
        batch = task.example_batch(spec, micro, device)
        with autocast():
            loss = task.loss(model, batch)
        loss.backward()
        return True
    except RuntimeError as exc:  # torch.OutOfMemoryError on a GPU; the CPU allocator raises a RuntimeError
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc):
            return False
        raise
    finally:
        del reserve
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()
