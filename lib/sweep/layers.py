"""`make sweep LAYERS=y`: how much each layer alone tolerates (the ``sweep`` distribution's input).

Every prunable layer is pruned on its own, by |w| to an exact count (``prune_count`` of the layer), to each
sweep sparsity while every other layer keeps the checkpoint's weights, and the copy is evaluated on the
validation split. The drop from the checkpoint is counted as the sweep's tolerance counts it: points of
accuracy, or percent of perplexity. The rows go to sweep.json and sweep.md; the curves to sweep/layers.json
(lib/pruning/sensitivity.py), which CONFIG_SPARSITY_DISTRIBUTION_FILE names.
"""

from __future__ import annotations

from typing import Any

import torch

from lib.core.task import Metric
from lib.pruning.prunable import prunable_parameters
from lib.pruning.threshold import exact_count_mask, prune_count


def drop(value: float, reference: float, metric: Metric) -> float:
    """How much worse ``value`` is than ``reference``: points below for accuracy, percent above for perplexity."""
    if metric.higher_is_better:
        return reference - value
    return 100.0 * (value / reference - 1.0)


@torch.no_grad()
def measure(subject: Any, reference: float, say: Any) -> dict[str, Any]:
    """{layer: {shape, size, sparsity (as trained), values, drops}} over ``subject.settings.sparsities``; the
    subject's model is restored after every row."""
    task, spec, metric = subject.task, subject.spec, subject.task.metric
    sparsities = list(subject.settings.sparsities)
    layers: dict[str, Any] = {}
    try:
        for name, param in prunable_parameters(subject.model):
            values = []
            for target in sparsities:
                subject.restore()
                scores = param.detach().abs().masked_fill(param == 0, float("-inf"))  # zeros stay pruned first
                param.mul_(exact_count_mask([scores], prune_count(param.numel(), target))[0])
                values.append(task.evaluate(subject.model, spec, "val")[metric.name])
            subject.restore()
            layers[name] = {"shape": list(param.shape), "size": param.numel(),
                            "sparsity": int((param == 0).sum()) / param.numel(), "values": values,
                            "drops": [drop(v, reference, metric) for v in values]}
            say(f"  layer {name:<28} " + "  ".join(f"{100 * s:g} %: {v:.4g}" for s, v in zip(sparsities, values,
                                                                                              strict=True)))
    finally:
        subject.restore()
    return layers


def record(run: str, model: str, checkpoint: dict[str, Any], metric: Metric, reference: float,
           sparsities: list[float], layers: dict[str, Any]) -> dict[str, Any]:
    """The content of sweep/layers.json (lib/pruning/sensitivity.py writes and reads it)."""
    unit = "points of accuracy" if metric.higher_is_better else "percent of perplexity"
    return {"run": run, "model": model, "checkpoint": checkpoint, "metric": metric.name, "reference": reference,
            "drop_unit": unit, "sparsities": sparsities, "layers": layers}
