"""What a pruner needs to prune layer by layer (CONFIG_SPARSITY_DISTRIBUTION other than global) or row by row
(Wanda): each layer's count of weights to keep (lib/pruning/distribution.py), the ``sweep`` curves checked
against the weights, OWL's deviations measured once on calibration text and kept in checkpoints, and the
per-layer report for summary.json."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.errors import HarnessError
from lib.core.spec import PruneSettings
from lib.core.task import first_batches
from lib.pruning import distribution, owl, sensitivity

Params = list[tuple[str, nn.Parameter]]
Calibration = tuple[Callable[[], Sequence[Any]], Callable[[Any], Any]]  # (the batches, forward of one batch)


class LayerTargets:
    """The per-layer counts of one pruner's distribution."""

    def __init__(self, settings: PruneSettings, params: Params):
        self.settings = settings
        self.kind = settings.distribution
        self.curves = sensitivity.curves_for(settings.layer_curves, params) if self.kind == "sweep" else []
        self.deviations: list[float] | None = None  # owl: measured at the first mask update, then kept
        self.calibration: Calibration | None = None  # set by the trainer; owl reads it once

    def kept(self, model: nn.Module, params: Params, sparsity: float) -> list[int]:
        """Whole weights each layer keeps at ``sparsity``, adding up to the exact overall count."""
        if self.kind == "owl" and self.deviations is None:
            self.deviations = self._measure_owl(model, params)
        return distribution.kept_counts(self.kind, [p.shape for _, p in params], sparsity, self.curves,
                                        self.deviations or ())

    def _measure_owl(self, model: nn.Module, params: Params) -> list[float]:
        if self.calibration is None:
            raise HarnessError("the owl distribution needs calibration text from the run's training data, and this "
                               "pruner was given none; choose another CONFIG_SPARSITY_DISTRIBUTION")
        batches, forward = self.calibration
        with torch.no_grad():
            shares = owl.outlier_shares(model, params, batches(), forward, self.settings.owl_m)
        return owl.deviations(params, shares, self.settings.owl_lambda)

    def report(self, params: Params, target: float) -> dict[str, Any]:
        """summary.json's per-layer entry: each layer's target and reached sparsity, and where targets came from."""
        if self.kind == "owl" and self.deviations is None:
            return {"distribution": self.kind, "layers": {}}  # no mask update yet: nothing measured
        kept = distribution.kept_counts(self.kind, [p.shape for _, p in params], target, self.curves,
                                        self.deviations or ())
        extra = {"source": self.settings.layer_source} if self.settings.layer_source else {}
        if self.kind == "owl":
            extra = {"owl": {"m": self.settings.owl_m, "lambda": self.settings.owl_lambda,
                             "calibration_batches": self.settings.owl_batches}}
        return {"distribution": self.kind, **extra, "layers": {
            name: {"target": (p.numel() - k) / p.numel(), "reached": int((p == 0).sum()) / p.numel()}
            for (name, p), k in zip(params, kept, strict=True)}}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.deviations is None else {"owl_deviations": list(self.deviations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "owl_deviations" in state:
            self.deviations = [float(d) for d in state["owl_deviations"]]


def calibration(task: Any, spec: Any, model: nn.Module, device: torch.device) -> Calibration:
    """The first ``spec.prune.owl_batches`` training micro-batches of the run's seed (the same on every rank) and
    the task's forward: what OWL measures outliers on."""

    return lambda: first_batches(task, spec, spec.prune.owl_batches, device), lambda batch: task.loss(model, batch)


def row_masks(ranked: Callable[[int], Tensor], params: Params, sparsity: float) -> list[Tensor]:
    """Every output row of every layer pruned to the same sparsity by ``ranked(i)`` (the scores of tensor i), the
    rounding remainder to the largest rows (``distribution.kept_counts``, rows as its units): exact overall."""
    rows = [(p.shape[0], p[0].numel()) for _, p in params]
    kept = distribution.kept_counts("uniform", [(width,) for count, width in rows for _ in range(count)], sparsity)
    masks, start = [], 0
    for i, (count, width) in enumerate(rows):
        keep = torch.tensor(kept[start:start + count], device=params[i][1].device).unsqueeze(1)
        start += count
        order = ranked(i).reshape(count, width).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=order.device).expand(
            count, width).contiguous())
        masks.append((rank < keep).reshape(params[i][1].shape))
    return masks
