"""SparseGPT (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
one-shot pruning that also rewrites the kept weights of each layer to make up for the pruned ones.

Per layer, with the calibration inputs X of that layer (rows: tokens; Conv inputs unfolded, im2col):
- H = 2 X^T X / n, plus 1 % of its mean diagonal (the paper's dampening) so it inverts; an input never
  nonzero gets H_jj = 1.
- The upper Cholesky factor U of H^-1 gives, column by column, the optimal update of the columns to the right
  when one weight is removed (optimal brain surgeon on the layer's least-squares reconstruction).
- Columns go in blocks of 128. Unstructured: in each block the weights of lowest w^2 / U_jj^2 are pruned; the
  count per block is the target's share, whole weights, remainder to the largest blocks, so the total over
  every layer is exactly round(s * N) (``distribution.kept_counts`` with blocks as units). N:M: in every group of
  M consecutive columns of a row, the M - N lowest of w^2 / U_jj^2 are pruned, chosen as the pass reaches the
  group (so earlier updates count).
- Each pruned weight's error (w - 0) / U_jj is spread over the row's later columns by U's row.

Layers are pruned one after another in module order, each on inputs that flow through the layers already
pruned (the paper's sequential setting), each forward stopped once the layer has seen its input. Only
Linear and Conv layers without groups are rewritten; a grouped convolution stays dense and is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lib.pruning import distribution
from lib.pruning.nm import split_by_fit
from lib.pruning.prunable import prunable_parameters
from lib.pruning.threshold import exact_count_mask

NAME = "sparsegpt"
BLOCK = 128  # columns updated together (the paper's lazy batch size)
DAMP = 0.01  # share of the mean diagonal of H added to it


class _Seen(Exception):
    """Raised by the input hook: the rest of the forward is not needed."""


def hessian(module: nn.Module, batches: Sequence[Any], forward: Callable[[Any], Any]) -> Tensor:
    """2 X^T X / n of ``module``'s inputs (float32, n = input rows) over ``forward(batch)`` of each batch, every
    forward stopped once the layer has its input."""
    weight = module.weight
    columns = weight[0].numel()
    h = torch.zeros(columns, columns, dtype=torch.float32, device=weight.device)
    seen = [0]

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        rows = _input_rows(mod, args[0].detach()).to(torch.float32)
        seen[0] += rows.shape[0]
        h.addmm_(rows.T, rows)
        raise _Seen

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                forward(batch)
            except _Seen:
                pass
    finally:
        handle.remove()
    return h.mul_(2.0 / max(seen[0], 1))


def _input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as the rows its weight matrix (out, columns) multiplies."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    x = x if x.dim() == module.weight.dim() else x.unsqueeze(0)
    if isinstance(module, nn.Conv2d):
        cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, nn.Conv1d):  # (N, C, L) -> (N, C, k, L') -> rows of C * k
        cols = nn.functional.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), (1, module.dilation[0]),
                                    (0, module.padding[0]), (1, module.stride[0]))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"SparseGPT: no input rows for {type(module).__name__}")


@torch.no_grad()
def reconstruct(weight: Tensor, h: Tensor, pruned: Iterable[int] | None = None, nm: tuple[int, int] | None = None,
                block: int = BLOCK, damp: float = DAMP) -> Tensor:
    """``weight`` (out, columns) pruned with SparseGPT's update: ``pruned[b]`` weights of column block b
    (unstructured), or N:M groups; returns the new float32 weight (pruned entries exactly 0)."""
    w = weight.detach().to(torch.float32).clone()
    h = h.clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(columns, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    counts = iter(pruned or ())
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, u1 = w[:, start:end].clone(), u[start:end, start:end]
        diag = torch.diag(u1)
        drop = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            drop = ~exact_count_mask([w1.square() / diag.square()], next(counts))[0]
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i:i + nm[1]].square() / diag[i:i + nm[1]].square()
                lowest = group.argsort(dim=1, stable=True)[:, : nm[1] - nm[0]]
                drop[:, i:i + nm[1]].scatter_(1, lowest, True)
            q = w1[:, i].masked_fill(drop[:, i], 0.0)
            error = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= error.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            errors[:, i] = error
        w[:, start:end] = w1
        w[:, end:] -= errors @ u[start:end, end:]
    return w


class SparseGPT:
    """The sweep's handle on SparseGPT, shaped like a pruner (``params``, ``prune_to``, ``sparsity``,
    ``report``, ``masks``, ``close``): ``forward(batch)`` runs the model on each calibration batch."""

    name = NAME
    reachable = 1.0

    def __init__(self, model: nn.Module, batches: Sequence[Any], forward: Callable[[Any], Any],
                 nm: tuple[int, int] | None = None):
        self.model, self.batches, self.forward, self.nm = model, batches, forward, nm
        self.block = BLOCK if nm is None else max(nm[1], BLOCK // nm[1] * nm[1])  # N:M groups within a block
        every = prunable_parameters(model)
        grouped = {name for name, _ in every if getattr(model.get_submodule(name.rpartition(".")[0]), "groups", 1) > 1}
        params = [(name, p) for name, p in every if name not in grouped]
        self.dense_layers: dict[str, int] = {name: p[0].numel() for name, p in every if name in grouped}
        if nm is not None:
            params, unfit = split_by_fit(params, nm[0], nm[1], model)
            self.dense_layers.update(unfit)
        self.params = params
        self.masks: dict[str, Tensor] = {}

    def prune_to(self, sparsity: float) -> None:
        """Prune and rewrite every layer in turn (module docstring)."""
        counts = iter(self._block_counts(sparsity))
        for name, param in self.params:
            module = self.model.get_submodule(name.rpartition(".")[0])
            blocks = math.ceil(param[0].numel() / self.block)
            pruned = [next(counts) for _ in range(blocks)] if self.nm is None else None
            h = hessian(module, self.batches, self.forward)
            new = reconstruct(param.reshape(param.shape[0], -1), h, pruned, self.nm, self.block)
            param.data.copy_(new.reshape(param.shape).to(param.dtype))

    def _block_counts(self, sparsity: float) -> list[int]:
        if self.nm is not None:
            return []
        shapes = [(p.shape[0], min(self.block, p[0].numel() - start)) for _, p in self.params
                  for start in range(0, p[0].numel(), self.block)]
        kept = distribution.kept_counts("uniform", shapes, sparsity)
        return [math.prod(shape) - k for shape, k in zip(shapes, kept, strict=True)]

    @torch.no_grad()
    def sparsity(self) -> float:
        total = sum(p.numel() for _, p in self.params)
        return sum(int((p == 0).sum()) for _, p in self.params) / total if total else 0.0

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dense_layers": dict(self.dense_layers)}
        if self.nm is not None:
            out["pattern"] = f"{self.nm[0]}:{self.nm[1]}"
        return out

    def close(self) -> None:
        """Nothing attached between calls (the hooks live for one layer's forwards)."""
