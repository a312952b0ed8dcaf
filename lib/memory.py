"""Peak-memory measurement and exact state-bytes accounting.

CPU: Linux keeps a resettable high-water mark of the resident set (VmHWM) that
is reset by writing 5 to /proc/self/clear_refs; tracemalloc does not see torch.
GPU: torch's own allocator peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch

if TYPE_CHECKING:
    from torch import nn

    from lib.spec import RunSpec
    from lib.task import Task


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process


def peak(device: torch.device) -> dict[str, int | None]:
    """Peak memory since reset_peak(): RSS always, CUDA allocated/reserved on a GPU."""
    result: dict[str, int | None] = {"peak_rss_bytes": _vm_hwm_bytes()}
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return result


def current(device: torch.device) -> dict[str, int | None]:
    """Memory now, for the memory timeline: in use at this moment (RSS; CUDA allocated on a GPU) and
    the peak so far since reset_peak() (the same counters as peak(), so the timeline's last peak sample
    and summary.json's peak measure one thing; the summary's also covers the test evaluation after it).

    Sampled between optimizer steps, the in-use figures miss each step's transient activations and
    logits; the peak-so-far figures include them.
    """
    result: dict[str, int | None] = {"rss_bytes": _status_bytes("VmRSS:"), "peak_rss_bytes": _vm_hwm_bytes()}
    if device.type == "cuda":
        result["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _vm_hwm_bytes() -> int | None:
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tensor_bytes(tensors: object) -> int:
    """Bytes held by every tensor found in a (nested) dict/list/tuple."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, pruning_buffers: int) -> dict[str, int]:
    """Exact bytes of weights, gradients (as when materialised), optimizer state and pruning buffers."""
    params = list(model.parameters())
    return {
        "weights": tensor_bytes(params),
        "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "optimizer_state": tensor_bytes(list(optimizer.state.values())),
        "pruning_buffers": pruning_buffers,
    }


# -- estimates for the hardware plan (no memory is allocated: shapes only, on the meta device) ----

SAVED_SAFETY = 1.25  # backward's transient activation gradients on top of what autograd saves
HALF_KEEPS = 0.7  # 16-bit autocast keeps ~0.68 of fp32's saved bytes (GPT-2 124M, block 256, CPU bf16)
# Two fp32 Adam moments per weight. AMSGrad's third moment and movement pruning's scores are left to
# the safety margins: an estimate, and probe mode the check.
OPTIMIZER_STATE_BYTES_PER_WEIGHT = 8
STATE_BYTES_PER_WEIGHT = 4 + 4 + OPTIMIZER_STATE_BYTES_PER_WEIGHT  # fp32 weight, gradient, optimizer state
WORKSPACE_BYTES = 1 << 30  # CUDA context, cuBLAS workspace and allocator slack


@dataclass(frozen=True)
class Footprint:
    """Estimated device bytes of one training step: ``fixed`` + ``per_sample`` x micro-batch."""

    fixed: int
    per_sample: int

    def at(self, micro_batch: int) -> int:
        return self.fixed + self.per_sample * micro_batch

    def fits(self, usable: int) -> int:
        """The largest micro-batch whose estimate fits in ``usable`` bytes (0 if none)."""
        return max(0, (usable - self.fixed) // max(1, self.per_sample))


def estimate_footprint(task: Task, spec: RunSpec, dtype: str) -> Footprint:
    """What one step of ``spec``'s model needs, from the tensors autograd saves in an eager fp32 step.

    Measured on the meta device at micro-batch 1 and 2: the difference is the
    per-sample part. Eager fp32 with the math attention kernel saves more than a
    compiled 16-bit step with flash attention, so the estimate errs high; probe
    mode (CONFIG_PROBE_BATCH) measures the real thing.
    """
    key = (spec.model, json.dumps(spec.model_options, sort_keys=True, default=str), dtype)
    if key not in _FOOTPRINTS:
        with torch.device("meta"):
            model = task.build_model(spec)
        one, two = (_saved_bytes(task, model, spec, n) for n in (1, 2))
        half = dtype != "float32"
        weights = sum(p.numel() for p in model.parameters())
        per_sample = max(1, two - one)
        _FOOTPRINTS[key] = Footprint(
            fixed=weights * (STATE_BYTES_PER_WEIGHT + (2 if half else 0)) + max(0, one - per_sample)
            + WORKSPACE_BYTES,
            per_sample=int(per_sample * (HALF_KEEPS if half else 1.0) * SAVED_SAFETY),
        )
    return _FOOTPRINTS[key]


_FOOTPRINTS: dict[tuple, Footprint] = {}


def _saved_bytes(task: Task, model: nn.Module, spec: RunSpec, n: int) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward in one loss computation."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention):
        task.loss(model, task.example_batch(spec, n, torch.device("meta")))
    return sum(saved.values())


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention in estimates: on the meta device torch runs the
    math kernel, which saves the T x T attention matrix; a GPU runs a fused kernel (flash or
    memory-efficient) that saves q, k, v, the output and one log-sum-exp per query."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # never called: estimates run forward only
        raise NotImplementedError
