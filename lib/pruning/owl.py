"""OWL, outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A
Missing Secret Sauce for Pruning LLMs at High Sparsity"): the ``owl`` distribution's per-layer deviations.

From calibration text, every prunable weight gets Wanda's score ``|w| * ||x||_2`` (lib/pruning/importance.py).
A block's outlier share ``D`` is the share of its scores above ``M`` times their mean (the paper's M, default 5),
pooled over the block's layers; a block is the module path up to its first number ("h.3" for every layer of
GPT-2's fourth block), and a layer outside any numbered block is its own. Blocks with more outliers keep more
weights: with ``D`` scaled to [0, 2 * lambda] (lambda default 0.08) and centred on its weighted mean, a layer's
density is ``1 - s + deviation`` (lib/pruning/distribution.py), so sparsities span at most s +- lambda. The
paper centres on the plain mean over equal-sized blocks; weighting by size keeps the overall count exact when
blocks differ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lib.pruning.importance import Wanda, observing

M_DEFAULT, LAMBDA_DEFAULT = 5.0, 0.08


def block_of(name: str) -> str:
    """``"h.3.attn.c_attn.weight"`` -> ``"h.3"``; a name without a numbered part is its own block."""
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return match.group(1) if match else name


@torch.no_grad()
def outlier_shares(model: nn.Module, params: list[tuple[str, nn.Parameter]], batches: Sequence[Any],
                   forward: Callable[[Any], Any], m: float) -> dict[str, float]:
    """{block: share of its Wanda scores above ``m`` x their mean} over the calibration ``batches``."""
    wanda = Wanda(model, params)
    try:
        with observing(model, params):
            for batch in batches:
                forward(batch)
    finally:
        wanda.close()
    pooled: dict[str, list[torch.Tensor]] = {}
    for name, param in params:
        pooled.setdefault(block_of(name), []).append(wanda.score(name, param).reshape(-1).float())
    shares = {}
    for block, scores in pooled.items():
        flat = torch.cat(scores)
        shares[block] = float((flat > m * flat.mean()).float().mean())
    return shares


def deviations(params: list[tuple[str, nn.Parameter]], shares: dict[str, float], lam: float) -> list[float]:
    """Each layer's density deviation: its block's share scaled to [0, 2 lambda], less the size-weighted mean."""
    low, high = min(shares.values()), max(shares.values())
    scaled = {b: (d - low) / (high - low) * 2 * lam if high > low else 0.0 for b, d in shares.items()}
    sizes = [p.numel() for _, p in params]
    per_layer = [scaled[block_of(name)] for name, _ in params]
    mean = sum(s * n for s, n in zip(per_layer, sizes, strict=True)) / sum(sizes)
    return [s - mean for s in per_layer]
