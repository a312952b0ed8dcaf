"""Peak-memory measurement and exact state-bytes accounting.

CPU: Linux keeps a resettable high-water mark of the resident set (VmHWM) that
is reset by writing 5 to /proc/self/clear_refs; tracemalloc does not see torch.
GPU: torch's own allocator peaks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lib.hardware import actckpt

if TYPE_CHECKING:
    from torch import nn

    from lib.core.spec import RunSpec
    from lib.core.task import Task
    from lib.hardware.actckpt import Segment


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
    """Bytes held by every tensor found in a (nested) dict/list/tuple (of a sharded tensor: this rank's shard)."""
    if isinstance(tensors, torch.Tensor):
        held = tensors.to_local() if callable(getattr(tensors, "to_local", None)) else tensors
        return held.numel() * held.element_size()
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
        "gradients": sum(tensor_bytes(p) for p in params if p.requires_grad),
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


def estimate_footprint(task: Task, spec: RunSpec, dtype: str, segments: Sequence[Segment] = (),
                       shards: int = 1) -> Footprint:
    """What one step of ``spec``'s model needs on one rank, from the tensors autograd saves in an eager fp32
    step, with the blocks of ``segments`` checkpointed (lib/hardware/actckpt.py; none by default) and the
    weights, gradients and optimizer state sharded over ``shards`` ranks (FSDP2; 1: replicated), plus a
    distillation teacher's weights (its forward runs without grad: its activations live one layer at a time).

    Measured on the meta device at micro-batch 1 and 2: the difference is the
    per-sample part. Eager fp32 with the math attention kernel saves more than a
    compiled 16-bit step with flash attention, so the estimate errs high; probe
    mode (CONFIG_PROBE_BATCH) measures the real thing.
    """
    profiles = activation_profiles(task, spec)
    one, two = (actckpt.peak_saved(segments, p) for p in profiles.at_one_two)
    half = dtype != "float32"
    per_sample = max(1, two - one)
    teacher = profiles.weights * 4 if spec.train.distill_weight else 0  # CONFIG_DISTILL: fp32, no grads, no state
    return Footprint(
        fixed=state_footprint(profiles, half, shards) + teacher + max(0, one - per_sample) + WORKSPACE_BYTES,
        per_sample=int(per_sample * (HALF_KEEPS if half else 1.0) * SAVED_SAFETY),
    )


def state_footprint(profiles: Profiles, half: bool, shards: int = 1) -> int:
    """Bytes of weights, gradients and optimizer state on one rank (and autocast's 16-bit weight copies).

    Sharded (FSDP2, one unit per block and the rest in the root unit): each rank keeps 1/``shards`` of the
    fp32 state, and while a unit runs its whole weights are gathered in the compute dtype. The root's stay
    gathered from forward to backward; a block's are gathered with the next block's prefetched, and its
    gradient is whole in fp32 until it is reduce-scattered.
    """
    if shards <= 1:
        return profiles.weights * (STATE_BYTES_PER_WEIGHT + (2 if half else 0))
    compute = 2 if half else 4
    largest = max(profiles.block_weights, default=0)
    root = profiles.weights - sum(profiles.block_weights)
    gathered = root * compute + 2 * largest * compute + largest * 4
    return -(-profiles.weights * STATE_BYTES_PER_WEIGHT // shards) + gathered


@dataclass(frozen=True)
class BlockProfile:
    """The bytes autograd saves for backward in one loss computation (meta device, eager fp32), by block."""

    total: int  # every saved non-parameter tensor, in blocks or not (embeddings, logits, loss)
    blocks: tuple[int, ...]  # saved while each block (Task.blocks) ran
    inputs: tuple[int, ...]  # each block's input: what a checkpoint of the block keeps instead
    kept: tuple[int, ...]  # each block's outputs of actckpt.SAVED_OPS: what the selective policy keeps

    def scaled(self, other: BlockProfile, micro_batch: int) -> BlockProfile:
        """The profile at ``micro_batch``, from this one (micro-batch 1) and ``other`` (micro-batch 2)."""
        def at(a: int, b: int) -> int:
            return max(0, a + (b - a) * (micro_batch - 1))

        return BlockProfile(at(self.total, other.total), *(tuple(at(a, b) for a, b in zip(x, y, strict=True))
                                                            for x, y in ((self.blocks, other.blocks),
                                                                         (self.inputs, other.inputs),
                                                                         (self.kept, other.kept))))


@dataclass(frozen=True)
class Profiles:
    """A model's saved bytes at micro-batch 1 and 2 (they grow linearly with it) and its weight count."""

    one: BlockProfile
    two: BlockProfile
    weights: int
    block_weights: tuple[int, ...] = ()  # each block's (Task.blocks) weights: FSDP2's units

    @property
    def at_one_two(self) -> tuple[BlockProfile, BlockProfile]:
        return self.one, self.two

    def at(self, micro_batch: int) -> BlockProfile:
        return self.one.scaled(self.two, micro_batch)


def activation_profiles(task: Task, spec: RunSpec) -> Profiles:
    """``spec``'s model profiled on the meta device (no memory allocated); cached per model and options."""
    key = (spec.model, json.dumps(spec.model_options, sort_keys=True, default=str))
    if key not in _PROFILES:
        with torch.device("meta"):
            model = task.build_model(spec)
        one, two = (block_profile(task, model, spec, n) for n in (1, 2))
        blocks = tuple(sum(p.numel() for p in b.parameters()) for b in task.blocks(model))
        _PROFILES[key] = Profiles(one, two, sum(p.numel() for p in model.parameters()), blocks)
    return _PROFILES[key]


_PROFILES: dict[tuple, Profiles] = {}


def block_profile(task: Task, model: nn.Module, spec: RunSpec, n: int) -> BlockProfile:
    """``profile`` of one loss computation at micro-batch ``n`` on the meta device, where the fused
    attention kernel a GPU runs stands in for torch's math kernel (it would save the T x T matrix)."""
    batch = task.example_batch(spec, n, torch.device("meta"))
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention):
        return profile(model, task.blocks(model), lambda: task.loss(model, batch))


def profile(model: nn.Module, blocks: Sequence[nn.Module], loss: Callable[[], torch.Tensor]) -> BlockProfile:
    """The saved bytes of ``loss()``, each storage counted once, in the block that saved it first; with
    each block's input and its outputs of the ops selective checkpointing keeps. Runs forward only."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, block index or -1)
    inputs, kept, where = [0] * len(blocks), [0] * len(blocks), [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in saved:
            saved[storage._cdata] = (storage.nbytes(), where[0])
        return t

    def enter(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            where[0] = i
            inputs[i] = args[0].untyped_storage().nbytes()
        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: where.__setitem__(0, -1)) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _KeptOutputs(where, kept):
            loss()
    finally:
        for h in handles:
            h.remove()
    per_block = [0] * len(blocks)
    for nbytes, i in saved.values():
        if i >= 0:
            per_block[i] += nbytes
    return BlockProfile(sum(b for b, _ in saved.values()), tuple(per_block), tuple(inputs), tuple(kept))


class _KeptOutputs(TorchDispatchMode):
    """Adds up, per block, the output bytes of the ops whose outputs selective checkpointing keeps."""

    def __init__(self, where: list[int], kept: list[int]) -> None:
        super().__init__()
        self.where, self.kept = where, kept

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.where[0] >= 0 and func in actckpt.SAVED_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.kept[self.where[0]] += first.untyped_storage().nbytes()
        return out


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention in estimates: on the meta device torch runs the
    math kernel, which saves the T x T attention matrix; a GPU runs a fused kernel (flash or
    memory-efficient) that saves q, k, v, the output and one log-sum-exp per query."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # the fused kernel itself (meta shapes only): selective checkpointing's profile sees it as kept
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention.default(q, k, v, None, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # never called: estimates run forward only
        raise NotImplementedError
