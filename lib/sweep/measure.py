"""Size and speed of one sweep row, measured here beside the dense model (lib/sweep/oneshot.py).

Size is counted, per pattern, as the model would be stored:
- dense and unstructured: every tensor dense; unstructured also as a compressed file would hold it,
  the kept values plus one bit per prunable weight (the harness's packed masks, lib/optim/bitmask.py);
- N:M: the N kept values of every group plus their positions, ceil(log2 M) bits each (2 bits for 2:4,
  the metadata NVIDIA's sparse kernels read), the layers outside the pattern dense;
- structured: the smaller model that surgery cuts out (lib/surgery/command.smaller), dense.

Speed is the median of repeated no-grad forwards, interleaved with the dense model's in the same
process (lib/surgery_measure.latency), at batch 1 and at ``LARGE_BATCH``. On the CPU, zeros
computed by dense kernels cost what the weights cost: unstructured and N:M rows run at the dense
speed, and only structurally smaller models are faster. On a CUDA GPU of compute capability 8.0 or
newer a 2:4 row also runs on torch's semi-structured sparse kernels (``to_sparse_semi_structured``),
both sides in float16.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from lib.core import timing
from lib.core.spec import RunSpec
from lib.core.task import Task
from lib.pruning.prunable import prunable_parameters
from lib.surgery.measure import LARGE_BATCH, latency, timings

REPEATS = 7  # at least; a fast forward is repeated until both sides have run for about TIMED_MS
TIMED_MS = 100.0
CPU_NOTE = ("measured on the CPU: unstructured and N:M zeros run on the dense kernels, so they give no "
            "speed-up here; only the structured rows (cut physically smaller) are faster")


def sizes(model: nn.Module, pattern: str, coverage: list[str] | None = None) -> dict[str, int]:
    """Parameters, nonzero parameters, dense bytes and bytes as ``pattern`` would store them.
    ``coverage``: the weights an N:M pattern holds (the rest stays dense). An int8 weight (lib/quant) counts a
    byte per entry plus its scales."""
    params = dict(model.named_parameters())  # shared tensors once
    dense = sum(_bytes(p, p.numel()) for p in params.values())
    stored = dense
    prunable = {name: p for name, p in params.items() if name in dict(prunable_parameters(model))
                or hasattr(p, "qdata")}
    if pattern == "unstructured":
        stored = dense - sum(_bytes(p, p.numel()) - _bytes(p, _kept(p)) - math.ceil(p.numel() / 8)
                             for p in prunable.values())
    elif ":" in pattern:
        bits = math.ceil(math.log2(int(pattern.split(":")[1])))  # position of each kept value in its group
        for name in coverage or []:
            p = prunable[name]
            kept = _kept(p)
            stored -= _bytes(p, p.numel()) - _bytes(p, kept) - math.ceil(kept * bits / 8)
    return {"parameters": sum(p.numel() for p in params.values()), "nonzero": sum(_kept(p) for p in params.values()),
            "dense_bytes": dense, "stored_bytes": stored}


def _kept(param: torch.Tensor) -> int:
    return int(torch.count_nonzero(getattr(param, "qdata", param)))


def _bytes(param: torch.Tensor, entries: int) -> int:
    """Bytes of ``entries`` values of ``param``: 1 each for int8 (plus the scales once), else its dtype's."""
    if hasattr(param, "qdata"):
        return entries + param.scale.numel() * param.scale.element_size()
    return entries * param.element_size()


def int8_row(task: Task, spec: RunSpec, model: nn.Module, dense_cpu: nn.Module, pattern: str,
             coverage: list[str] | None = None) -> dict[str, Any]:
    """``model`` (a pruned row's, or dense) after torchao int8 on the CPU (lib/quant): val metric, size as
    stored, and latency beside the dense float32 model, with spread; ``skipped`` when it has no Linear layer."""
    from lib.core.errors import HarnessError
    from lib.quant import quantize_int8

    int8 = copy.deepcopy(model).cpu().eval()
    try:
        facts = quantize_int8(int8, spec.model)
    except HarnessError as exc:
        return {"skipped": str(exc)}
    cpu = torch.device("cpu")
    return {"val": task.evaluate(int8, spec, "val"), "size": sizes(int8, pattern, coverage),
            "layers": len(facts["quantized"]), "zeros_kept": facts["zeros_kept"],
            "speed": speed(task, spec, dense_cpu, int8, cpu)}


def speed(task: Task, spec: RunSpec, dense: nn.Module, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Latency at batch 1 and throughput at ``LARGE_BATCH`` of ``model`` and of ``dense``, side by side."""
    result: dict[str, Any] = {}
    checks = []
    for batch in (1, LARGE_BATCH):
        once = latency(task, spec, [dense], batch, device, 1)[0]  # sub-millisecond forwards need many repeats
        repeats = min(100, max(REPEATS, math.ceil(TIMED_MS / max(once, 1e-3))))
        machine = timing.load()
        ours, theirs = timings(task, spec, [model, dense], batch, device, repeats)
        result[f"latency_ms_batch_{batch}"] = ours.median_ms
        result[f"dense_latency_ms_batch_{batch}"] = theirs.median_ms
        result[f"speedup_batch_{batch}"] = theirs.median_ms / ours.median_ms if ours.median_ms else None
        result[f"timing_batch_{batch}"] = timing.record([ours, theirs], machine)
        checks.append(result[f"timing_batch_{batch}"])
    result["reliable"] = all(c["reliable"] for c in checks)  # a recommendation may rest on it only then
    result["unreliable_why"] = "; ".join(dict.fromkeys(c["why"] for c in checks if c["why"]))
    samples = task.samples_in(task.example_batch(spec, LARGE_BATCH, torch.device("cpu")))
    result["throughput"] = samples / (result[f"latency_ms_batch_{LARGE_BATCH}"] / 1000)
    result["unit"] = f"{task.sample_unit}/s at batch {LARGE_BATCH}"
    return result


def semi_structured_ok(device: torch.device) -> bool:
    """True on a CUDA GPU of compute capability 8.0 or newer (torch's 2:4 sparse kernels)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def semi_structured_pair(dense: nn.Module, model: nn.Module, coverage: list[str]) -> tuple[nn.Module, nn.Module, int]:
    """float16 copies of ``dense`` and of the 2:4-masked ``model`` whose covered Linear weights are
    torch semi-structured sparse tensors; and how many layers were converted (shapes the kernels refuse
    stay dense)."""
    from torch.sparse import to_sparse_semi_structured

    dense_half, sparse_half = copy.deepcopy(dense).half(), copy.deepcopy(model).half()
    converted = 0
    for name in coverage:
        module = sparse_half.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear):
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            converted += 1
        except (RuntimeError, ValueError):
            continue  # a shape below the kernels' minimum: this layer stays dense on both sides
    return dense_half, sparse_half, converted
