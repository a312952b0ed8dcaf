"""Activation checkpointing policies (seed 004): which blocks recompute their activations in backward.

torch does the work (``torch.utils.checkpoint``, non-reentrant, RNG state replayed, and
``create_selective_checkpoint_contexts`` for the operation-cost rule); this module only
decides *where*, for the ordered block list a task exposes (``Task.blocks``: GPT-2's
transformer blocks, ResNet's residual blocks; LeNet-5 has none worth it).

A plan is a list of segments ``(first, last, mode)`` over the blocks, in forward order:

- ``none``: nothing is checkpointed;
- ``uniform``: every Nth block alone (blocks N-1, 2N-1, ...);
- ``sqrt``: about sqrt(n) evenly sized segments, each checkpointed as one unit, so only the
  segment inputs stay saved (Chen et al. 2016);
- ``budget``: the blocks with the largest activations, one by one, until the estimate fits;
- ``selective``: every block, but inside it matmuls, attention and norms keep their outputs
  and only pointwise ops are recomputed (the operation-cost rule).

``apply`` installs a plan by giving the first block of each segment an instance-level
``forward`` that runs the whole segment under checkpoint and the others a pass-through, so
module names, state dicts, pruning and checkpoints are untouched; ``remove`` undoes it.
The blocks must be applied in sequence, each taking and returning one tensor.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lib.errors import ConfigError

POLICIES = ("none", "uniform", "sqrt", "budget", "selective")
_aten = torch.ops.aten
# Expensive to recompute: their outputs are saved under ``selective`` (seed 004's operation-cost rule).
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten.convolution.default, _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_attention_math.default,
    _aten.native_layer_norm.default, _aten._softmax.default, _aten.native_batch_norm.default,
    _aten._native_batch_norm_legit.default, _aten._native_batch_norm_legit_no_training.default,
}


@dataclass(frozen=True)
class Segment:
    first: int  # index of its first block
    last: int  # index of its last block (inclusive)
    selective: bool = False  # recompute only pointwise ops inside


def choose(policy: str, n: int, *, every: int = 2, budget: float = 0.0,
           block_bytes: Sequence[float] = ()) -> list[Segment]:
    """The segments ``policy`` checkpoints among ``n`` blocks (module docstring).

    ``every``: uniform's N. ``budget``, ``block_bytes``: the activation bytes allowed and
    each block's estimated activation bytes when not checkpointed (``budget`` policy).
    """
    if policy not in POLICIES:
        raise ConfigError(f"activation checkpointing policy {policy!r} is unknown; valid: {', '.join(POLICIES)}")
    if policy == "none":
        return []
    if n < 1:
        raise ConfigError(f"activation checkpointing ({policy}) needs a model with blocks; this one has none: "
                          "choose ACTIVATION_CKPT_NONE")
    if policy == "uniform":
        if not 1 <= every <= n:
            raise ConfigError(f"CONFIG_ACTIVATION_CKPT_EVERY={every}: checkpoint every Nth of {n} blocks needs "
                              f"1 <= N <= {n}")
        return [Segment(i, i) for i in range(every - 1, n, every)]
    if policy == "sqrt":
        count = max(1, round(math.sqrt(n)))
        bounds = [round(k * n / count) for k in range(count + 1)]
        return [Segment(a, b - 1) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    if policy == "selective":
        return [Segment(i, i, selective=True) for i in range(n)]
    return _within_budget(n, budget, block_bytes)


def _within_budget(n: int, budget: float, block_bytes: Sequence[float]) -> list[Segment]:
    """Checkpoint the largest blocks first until the estimated activations fit ``budget``.

    A checkpointed block still keeps its input (estimated as its smallest saved tensor is
    unknown here: taken as 1/8 of its activations) and the block being recomputed holds its
    own activations again, so the floor is the largest block plus those inputs.
    """
    if len(block_bytes) != n:
        raise ConfigError(f"budget policy: {len(block_bytes)} block sizes for {n} blocks")
    total = float(sum(block_bytes))
    floor = max(block_bytes) + sum(b / 8 for b in block_bytes)
    if budget < floor:
        raise ConfigError(f"CONFIG_ACTIVATION_BUDGET_MB={budget / 2**20:.0f}: below what checkpointing every block "
                          f"still needs ({floor / 2**20:.1f} MiB: one block recomputed plus every block's input); "
                          f"raise it, or use a smaller micro-batch")
    chosen: list[int] = []
    for i in sorted(range(n), key=lambda i: -block_bytes[i]):
        if total <= budget:
            break
        chosen.append(i)
        total -= block_bytes[i] * 7 / 8
    return [Segment(i, i) for i in sorted(chosen)]


def _selective_context() -> tuple[Any, Any]:
    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _run_segment(blocks: Sequence[nn.Module], x: Tensor) -> Tensor:
    for block in blocks:
        x = type(block).forward(block, x)  # the class's forward: the instance one is this wrapper
    return x


def apply(blocks: Sequence[nn.Module], segments: Sequence[Segment]) -> None:
    """Install ``segments`` on ``blocks`` (module docstring); replaces any earlier plan."""
    remove(blocks)
    for seg in segments:
        members = list(blocks[seg.first:seg.last + 1])
        options: dict[str, Any] = {"use_reentrant": False}
        if seg.selective:
            options["context_fn"] = _selective_context
        run = functools.partial(checkpoint, functools.partial(_run_segment, members), **options)
        members[0].forward = run  # type: ignore[method-assign]
        for block in members[1:]:
            block.forward = _pass_through  # type: ignore[method-assign]


def remove(blocks: Sequence[nn.Module]) -> None:
    """Undo ``apply``: every block runs its own forward again."""
    for block in blocks:
        block.__dict__.pop("forward", None)


def _pass_through(x: Tensor) -> Tensor:
    return x  # computed inside the segment's first block


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc before 2.33
        return None
    fn.restype = _MallInfo2
    return fn


def _bytes_in_use(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    info = _mallinfo2()
    if info is None:
        return None
    now = info()
    return now.uordblks + now.hblkhd  # malloc'd bytes in use: small chunks + mmap'd large ones


def activation_bytes(forward: Callable[[], Tensor], device: torch.device) -> int | None:
    """Bytes a forward pass leaves alive for backward (then runs backward): what checkpointing reduces.

    Memory in use after ``forward()`` minus before it: the CUDA allocator's count on a GPU,
    glibc's ``mallinfo2`` on the CPU (torch's CPU tensors come from malloc). None where
    neither exists. Run one warm-up first: the first pass also allocates lasting caches.
    """
    gc.collect()
    before = _bytes_in_use(device)
    loss = forward()
    after = _bytes_in_use(device)
    loss.backward()
    return None if before is None or after is None else after - before
