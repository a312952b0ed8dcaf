"""Peak-memory measurement and exact state-bytes accounting.

CPU: Linux keeps a resettable high-water mark of the resident set (VmHWM) that
is reset by writing 5 to /proc/self/clear_refs; tracemalloc does not see torch.
GPU: torch's own allocator peaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn


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
    """Memory in use now (for the memory timeline): RSS, and CUDA allocated on a GPU."""
    result: dict[str, int | None] = {"rss_bytes": _status_bytes("VmRSS:")}
    if device.type == "cuda":
        result["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
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
