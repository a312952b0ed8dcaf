"""Activation checkpointing policies: which blocks recompute their activations in backward.
(docs/algorithms.md, "Activation checkpointing policies")

torch does the work (``torch.utils.checkpoint``, non-reentrant, RNG state replayed, and
``create_selective_checkpoint_contexts`` for the operation-cost rule); this module only
decides *where*, for the ordered block list a task exposes (``Task.blocks``: GPT-2's
transformer blocks, ResNet's residual blocks; LeNet-5 has none worth it).

A plan is a list of segments ``(first, last, mode)`` over the blocks, in forward order:

- ``none``: nothing is checkpointed;
- ``uniform``: every Nth block alone (blocks N-1, 2N-1, ...);
- ``sqrt``: about sqrt(n) evenly sized segments, each checkpointed as one unit, so only the
  segment inputs stay saved (Chen et al. 2016);
- ``budget``: the blocks with the largest activations, one by one, until the estimated peak
  (``peak_saved``, from lib/memory's profile of saved bytes by block) fits;
- ``selective``: every block, but inside it matmuls, convolutions, attention, layer norms and
  softmax keep their outputs and the rest (pointwise ops, batch norm) is recomputed (the
  operation-cost rule).

``apply`` installs a plan by giving the first block of each segment an instance-level
``forward`` that runs the whole segment under checkpoint and the others a pass-through, so
module names, state dicts, pruning and checkpoints are untouched; ``remove`` undoes it.
The blocks must be applied in sequence, each taking and returning one tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lib.core.errors import ConfigError
from lib.core.units import mib

if TYPE_CHECKING:
    from lib.hardware.memory import BlockProfile

POLICIES = ("none", "uniform", "sqrt", "budget", "selective")
_aten = torch.ops.aten
# Expensive to recompute: their outputs are saved under ``selective`` (the operation-cost rule).
# Batch norm is not among them: in training it is a reduction and pointwise ops, and saving its output
# measured 1.25x none's bytes on ResNet-18 (the in-place ReLU after it makes the saved copy extra);
# recomputed, selective keeps 0.78x at 1.13x the time (scripts/bench_activation_ckpt.py).
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten.convolution.default, _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_attention_math.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten.native_layer_norm.default,
    _aten._softmax.default,
}


@dataclass(frozen=True)
class Segment:
    first: int  # index of its first block
    last: int  # index of its last block (inclusive)
    selective: bool = False  # recompute only pointwise ops inside


def choose(policy: str, n: int, *, every: int = 2, budget: float = 0.0,
           profile: BlockProfile | None = None) -> list[Segment]:
    """The segments ``policy`` checkpoints among ``n`` blocks (module docstring).

    ``every``: uniform's N. ``budget``, ``profile``: the activation bytes allowed and the
    model's saved bytes by block at the planned micro-batch (``budget`` policy).
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
    if profile is None or len(profile.blocks) != n:
        raise ConfigError(f"budget policy: no activation profile of the {n} blocks to choose from")
    return within_budget(budget, profile)


def forward_saved(segments: Sequence[Segment], profile: BlockProfile) -> int:
    """Estimated activation bytes a forward leaves saved for backward with ``segments`` checkpointed:
    a segment keeps its input (and, selective, its kept op outputs) instead of its activations."""
    return profile.total - sum(max(0, _full(seg, profile) - _keeps(seg, profile)) for seg in segments)


def peak_saved(segments: Sequence[Segment], profile: BlockProfile) -> int:
    """``forward_saved`` plus the largest segment's activations while backward recomputes it: the
    estimated activation bytes at the peak of a step."""
    recomputed = max((_full(seg, profile) - _keeps(seg, profile) + profile.inputs[seg.first] for seg in segments),
                     default=0)
    return forward_saved(segments, profile) + recomputed


def _full(seg: Segment, profile: BlockProfile) -> int:
    return sum(profile.blocks[seg.first:seg.last + 1])


def _keeps(seg: Segment, profile: BlockProfile) -> int:
    return profile.inputs[seg.first] + (sum(profile.kept[seg.first:seg.last + 1]) if seg.selective else 0)


def within_budget(budget: float, profile: BlockProfile) -> list[Segment]:
    """Checkpoint the blocks with the largest activations, one at a time, until the estimated peak
    (``peak_saved``) fits ``budget`` bytes; refuse a budget below checkpointing every block."""
    n = len(profile.blocks)
    floor = peak_saved([Segment(i, i) for i in range(n)], profile)
    if budget < floor:
        raise ConfigError(f"CONFIG_ACTIVATION_BUDGET_MB={budget / 2**20:.0f}: below the {mib(floor)} "
                          f"that checkpointing every block still needs at this micro-batch (block inputs, the "
                          f"layers outside blocks, one block recomputed); raise it, or lower the micro-batch")
    chosen: list[int] = []
    for i in sorted(range(n), key=lambda i: -profile.blocks[i]):
        if peak_saved([Segment(j, j) for j in sorted(chosen)], profile) <= budget:
            break
        chosen.append(i)
    return [Segment(i, i) for i in sorted(chosen)]


def describe(segments: Sequence[Segment], n: int) -> str:
    """``segments`` in words for the plan's rationale."""
    units = sum(s.last - s.first + 1 for s in segments)
    return f"{len(segments)} segment(s) over {units} of {n} blocks"


def _selective_context() -> tuple[Any, Any]:
    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _run_segment(blocks: Sequence[nn.Module], x: Tensor) -> Tensor:
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        with _running_stats_kept(blocks):  # backward is recomputing: the forward already updated them
            return _forward(blocks, x)
    return _forward(blocks, x)


def _forward(blocks: Sequence[nn.Module], x: Tensor) -> Tensor:
    for block in blocks:
        x = type(block).forward(block, x)  # the class's forward: the instance one is this wrapper
    return x


@contextlib.contextmanager
def _running_stats_kept(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Batch norms in training mode update their running statistics on every call: a recomputation
    would count the batch twice. Put them back as they were (compiled graphs never rerun Python)."""
    norms = [m for b in blocks for m in b.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    with _disable_current_modes():  # not ops of the segment: selective checkpointing must not see them
        kept = [[t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with _disable_current_modes():
            for m, (mean, var, count) in zip(norms, kept, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


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


def bytes_in_use(device: torch.device) -> int:
    """Bytes allocated now on ``device`` (CUDA allocator; glibc's malloc count on the CPU; 0 where unknown)."""
    return _bytes_in_use(device) or 0


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
