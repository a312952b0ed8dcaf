"""What surgery changed, measured on this machine (measured results, not claims).

For the model before and after a cut: parameters, checkpoint bytes (the serialized
payload), optimizer-state bytes, training memory and inference latency.

Training memory is counted, not sampled: exact bytes of weights, gradients, optimizer
state and pruning buffers (lib/memory.state_bytes) plus the activation bytes one
training forward of a micro-batch saves for backward (lib/memory.profile, hooks on
autograd's saved tensors); on the CPU a resident-set peak would mostly measure the
allocator. Activations are counted at the run's micro-batch, at most ``PROFILE_BATCH``.
Latency is the median of ``REPEATS`` no-grad forwards at batch 1 and at ``LARGE_BATCH``,
old and new interleaved so that both see the same machine state.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from lib.core import timing
from lib.core.spec import RunSpec
from lib.core.task import Task
from lib.core.units import mib
from lib.hardware import memory

REPEATS = 5
LARGE_BATCH = 16
PROFILE_BATCH = 8  # at most: a GPU run's micro-batch (64 x 1024 tokens of GPT-2) would not fit a CPU forward


def before_after(task: Task, spec: RunSpec, old: tuple[Any, dict], new: tuple[Any, dict]) -> dict[str, Any]:
    """{quantity: {"before": ..., "after": ..., "ratio": after / before}} for a cut's two sides
    (each side: a lib.surgery.command.Trained and its checkpoint payload)."""
    sides = [_static(task, spec, trained, payload) for trained, payload in (old, new)]
    checks = {}
    for batch in (1, LARGE_BATCH):
        machine = timing.load()
        times = timings(task, spec, [old[0].model, new[0].model], batch)
        checks[f"latency_ms_batch_{batch}"] = timing.record(times, machine)
        for side, t in zip(sides, times, strict=True):
            side[f"latency_ms_batch_{batch}"] = t.median_ms
    return {key: {"before": sides[0][key], "after": sides[1][key],
                  "ratio": sides[1][key] / sides[0][key] if sides[0][key] else None,
                  **({"timing": checks[key]} if key in checks else {})} for key in sides[0]}


def _static(task: Task, spec: RunSpec, trained: Any, payload: dict) -> dict[str, float]:
    model, optimizer = trained.model, trained.optimizer
    state = memory.state_bytes(model, optimizer, trained.pruner.buffer_bytes())
    batch = task.example_batch(spec, profile_batch(spec), torch.device("cpu"))
    model.train()
    saved = memory.profile(model, task.blocks(model), lambda: task.loss(model, batch)).total
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return {"parameters": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": buffer.tell(),
            "optimizer_state_bytes": state["optimizer_state"],
            "training_memory_bytes": sum(state.values()) + saved}


def profile_batch(spec: RunSpec) -> int:
    """The micro-batch whose saved activations count into training memory."""
    return min(spec.hardware.micro_batch, PROFILE_BATCH)


@torch.no_grad()
def latency(task: Task, spec: RunSpec, models: list[torch.nn.Module], batch: int,
            device: torch.device | None = None, repeats: int = REPEATS) -> list[float]:
    """Median milliseconds of one no-grad forward of ``batch`` examples for each model (all on ``device``),
    the models interleaved so that each sees the same machine state."""
    return [t.median_ms for t in timings(task, spec, models, batch, device, repeats)]


@torch.no_grad()
def timings(task: Task, spec: RunSpec, models: list[torch.nn.Module], batch: int,
            device: torch.device | None = None, repeats: int = REPEATS) -> list[timing.Timing]:
    """Median and interquartile range of one no-grad forward per model, interleaved (lib/core/timing.py)."""
    device = device or torch.device("cpu")
    inputs = task.example_batch(spec, batch, device)[0]
    calls = []
    for model in models:
        model.eval()
        x = inputs.to(next(model.parameters()).dtype) if inputs.is_floating_point() else inputs
        calls.append(lambda model=model, x=x: model(x))
    return timing.measure(calls, repeats, lambda: _sync(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(record: dict[str, Any]) -> str:
    """The before/after table of a surgery record, as Markdown."""
    rows = ["| quantity | before | after | after / before |", "|---|---:|---:|---:|"]
    for key, value in record["measured"].items():
        ratio = f"{value['ratio']:.3f}" if value["ratio"] is not None else "-"
        if value.get("timing") and not value["timing"]["reliable"]:
            ratio += f" (unreliable: {value['timing']['why']})"
        rows.append(f"| {key.replace('_', ' ')} | {_fmt(key, value['before'])} | {_fmt(key, value['after'])} "
                    f"| {ratio} |")
    loss = record.get("val_loss")
    if loss:
        rows.append(f"| validation loss | {loss['before']:.4f} | {loss['after']:.4f} | rise {loss['rise']:+.4f} |")
    return "\n".join(rows)


def _fmt(key: str, value: float) -> str:
    if key.endswith("_bytes"):
        return mib(value, 2)
    if key.startswith("latency"):
        return f"{value:.2f} ms"
    return f"{int(value):,}"
