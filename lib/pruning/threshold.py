"""Thresholds: turn importance scores into keep-masks (True = keep).

``exact`` is one global threshold over all prunable tensors that prunes
exactly ``k = round(sparsity * N)`` entries. ``sampled`` takes the cut from a
random sample of the scores (for very large models); ``per-layer`` prunes each
tensor to the target on its own. Each is a function
``(scores, sparsity, *, seed=0) -> masks`` registered in ``THRESHOLDS``;
``seed`` (the pruner passes its update step) only matters to ``sampled``, so
that every DDP rank draws the same sample.

``scores`` is any sequence of tensors. ``LazyScores`` computes each one on
access, so a threshold holds at most one full-size copy of all scores at a
time (``exact``'s flat buffer); ``sampled`` and ``per-layer`` hold none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from lib.core.errors import ConfigError
from lib.optim.kernels import native

ThresholdFn = Callable[..., list[Tensor]]  # (scores, sparsity, *, seed=0) -> keep-masks


class LazyScores(Sequence[Tensor]):
    """Scores computed one tensor at a time, on each access (``compute(i)``), never all at once.

    ``gather(i, index)``, if given, returns only the flattened entries
    ``index`` of tensor ``i`` (what ``sampled`` needs) without computing the rest.
    """

    def __init__(
        self,
        compute: Callable[[int], Tensor],
        sizes: list[int],
        gather: Callable[[int, Tensor], Tensor] | None = None,
        device: torch.device | None = None,
    ):
        self.compute = compute
        self.sizes = sizes
        self.gather = gather
        self.device = device

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if not 0 <= i < len(self.sizes):
            raise IndexError(i)
        return self.compute(i).detach()

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self.sizes)))

    def take(self, i: int, index: Tensor) -> Tensor:
        """Flattened entries ``index`` of score tensor ``i``."""
        if self.gather is not None:
            return self.gather(i, index).detach()
        return self[i].reshape(-1)[index]


def _sizes(scores: Sequence[Tensor]) -> list[int]:
    return scores.sizes if isinstance(scores, LazyScores) else [s.numel() for s in scores]


def _kth_value(x: Tensor, j: int) -> float:
    """The j-th smallest entry (1-based) of the 1-D tensor ``x``, which may be reordered.

    On the CPU this partitions ``x`` in place (numpy introselect): unlike
    ``torch.kthvalue``, which clones its input and allocates int64 indices
    (12 extra bytes per score), it needs no memory beyond ``x`` itself.
    """
    if x.device.type != "cpu":  # sort: the same value, and no CUDA kthvalue for strict deterministic mode to refuse
        return torch.sort(x).values[j - 1].item()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    array = x.numpy()
    array.partition(j - 1)
    return float(array[j - 1])


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` entries a ``sparsity`` prunes."""
    return min(total, max(0, round(sparsity * total)))


def _flatten(scores: Sequence[Tensor], total: int) -> Tensor:
    """All scores copied once into one new flat buffer (float32, or float64 if any score is)."""
    flat: Tensor | None = None
    offset = 0
    for s in scores:
        if flat is None:
            dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
            flat = torch.empty(total, dtype=dtype, device=s.device)
        flat[offset:offset + s.numel()].copy_(s.reshape(-1))
        offset += s.numel()
        del s  # a lazily computed score is freed before the next one is made
    assert flat is not None
    return flat


def _trivial(scores: Sequence[Tensor], k: int, total: int) -> list[Tensor] | None:
    """The masks when nothing (k == 0) or everything (k == total) is pruned, else None."""
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k == total:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    return None


def global_exact_mask(scores: Sequence[Tensor], sparsity: float, *, seed: int = 0) -> list[Tensor]:
    """Keep-masks that prune exactly ``round(sparsity * N)`` lowest scores over all tensors.

    Scores equal to the threshold are pruned in order (tensor order, then
    flattened index) until the count is exact, so ties are broken
    deterministically and the reached sparsity never depends on them.
    Deterministic: ``seed`` is ignored. Holds one flat copy of the scores
    while the threshold is found, none while the masks are built.
    """
    return exact_count_mask(scores, prune_count(sum(_sizes(scores)), sparsity))


def exact_count_mask(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """``global_exact_mask`` for a count: prune exactly the ``k`` lowest scores over all tensors, ties in order."""
    total = sum(_sizes(scores))
    trivial = _trivial(scores, k, total)
    if trivial is not None:
        return trivial
    flat = _flatten(scores, total)
    value = _kth_value(flat, k)
    below = int((flat < value).sum())  # order-free, so valid after the in-place partition
    del flat
    return _prune_ties(scores, value, k - below)


def _prune_ties(scores: Sequence[Tensor], value: float, ties_to_prune: int) -> list[Tensor]:
    """Prune every score below ``value`` and the first ``ties_to_prune`` equal to it (tensor, then index order)."""
    masks = []
    for s in scores:
        prune = s < value
        ties = s == value
        n_ties = int(ties.sum())
        if n_ties <= ties_to_prune:
            prune |= ties
            ties_to_prune -= n_ties
        elif ties_to_prune > 0:
            # Only the first ties_to_prune equal entries of this tensor (flattened order).
            first = ties.reshape(-1).cumsum(0) <= ties_to_prune
            prune |= (ties.reshape(-1) & first).reshape(s.shape)
            ties_to_prune = 0
        masks.append(~prune)
    return masks


def exact_value(scores: Sequence[Tensor], sparsity: float) -> float:
    """The exact global cut: the ``round(sparsity * N)``-th smallest score (what ``exact`` prunes up to)."""
    total = sum(_sizes(scores))
    return _kth_value(_flatten(scores, total), max(1, prune_count(total, sparsity)))


# The tolerance is a 3.22-sigma bound: P(|error| > tolerance) = 0.13 % per update, so 40 updates in a
# row all stay within it with probability 0.95 (the benchmark's worst-of-40-draws target).
SAMPLE_Z = 3.22
BLOCK = 64  # scores per drawn block: four 64-byte cache lines of float32, read whole


def sample_size(sparsity: float, tolerance: float = 0.1) -> int:
    """Scores to sample so the reached sparsity is within ``tolerance`` points of the target (``SAMPLE_Z`` sigma).

    The standard error of a sample quantile's coverage is ``sqrt(s (1 - s) / n)``; solving
    ``SAMPLE_Z * se <= tolerance / 100`` gives ``n``, whatever the model's size: 2.59M
    scores at s = 0.5 and 0.1 points, fewer towards s = 0 or 1.
    """
    if not tolerance > 0:
        raise ValueError(f"sample tolerance {tolerance} must be > 0 (percentage points)")
    s = min(max(sparsity, 0.01), 0.99)
    return math.ceil(s * (1.0 - s) * (SAMPLE_Z * 100.0 / tolerance) ** 2)


def _block_counts(sizes: list[int], blocks_wanted: float, gen: torch.Generator) -> list[int]:
    """Blocks to draw from each tensor: its share of ``blocks_wanted``, rounded up or down at random.

    Proportional to the tensor's block count, and the random rounding keeps every
    tensor's expected share exact, so every score is drawn with the same probability.
    """
    blocks = [-(-n // BLOCK) for n in sizes]
    total = sum(blocks)
    shares = [blocks_wanted * b / total for b in blocks]
    ups = torch.rand(len(sizes), generator=gen).tolist()
    return [int(x) + (u < x - int(x)) for x, u in zip(shares, ups, strict=True)]


def _gather_blocks(scores: Sequence[Tensor], i: int, n: int, picks: Tensor, out: Tensor) -> int:
    """Write the scores of blocks ``picks`` of tensor ``i`` (``n`` scores) into ``out``; how many were written."""
    if not isinstance(scores, LazyScores) and n % BLOCK == 0 and scores[i].is_contiguous():
        torch.index_select(scores[i].reshape(-1, BLOCK), 0, picks, out=out[: picks.numel() * BLOCK].view(-1, BLOCK))
        return picks.numel() * BLOCK
    index = (picks.view(-1, 1) * BLOCK + torch.arange(BLOCK, device=picks.device)).view(-1)
    index = index[index < n]  # the tensor's last block may be short
    values = scores.take(i, index) if isinstance(scores, LazyScores) else scores[i].reshape(-1)[index]
    out[: values.numel()].copy_(values)
    return values.numel()


def sample_scores(scores: Sequence[Tensor], size: int, seed: int) -> Tensor:
    """About ``size`` scores drawn as random blocks of ``BLOCK`` neighbours, tensor by tensor (never concatenated).

    Cache-friendly (each block is a few neighbouring cache lines) and unbiased: every block
    of every tensor is drawn with the same probability (with replacement), so every
    score is, and each tensor contributes in proportion to its size. Neighbouring
    scores can be alike (one row of a weight matrix), which widens the error by the
    design effect ``1 + (BLOCK - 1) rho``; ``rho`` is ~0 for the benchmark's weights.
    The generator is seeded with ``seed`` only, so every rank draws the same sample.
    With ``size`` at or above the number of scores, all of them are returned.
    """
    if size < 1:
        raise ValueError(f"sample size {size} must be at least 1")
    sizes = _sizes(scores)
    total = sum(sizes)
    lazy = isinstance(scores, LazyScores)
    device = scores.device if lazy and scores.device is not None else scores[0].device
    if size >= total:
        return torch.cat([s.reshape(-1) for s in scores])
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    counts = _block_counts(sizes, size / BLOCK, gen)
    blocks = torch.tensor([-(-n // BLOCK) for n in sizes], dtype=torch.float64)
    # One uniform draw per block, scaled to its own tensor's block count: uniform over that tensor's blocks.
    picks = torch.rand(sum(counts), generator=gen, dtype=torch.float64)
    picks = picks.mul_(blocks.repeat_interleave(torch.tensor(counts))).floor_().to(torch.int64)
    dtype = torch.float32 if lazy else scores[0].dtype
    out = torch.empty(sum(counts) * BLOCK, dtype=dtype, device=device)
    if not lazy and native.gather_blocks_(list(scores), picks, counts, BLOCK, out):
        return out
    picks = picks.to(device)
    filled = start = 0
    for i, (n, count) in enumerate(zip(sizes, counts, strict=True)):
        if count:
            filled += _gather_blocks(scores, i, n, picks[start:start + count], out[filled:])
            start += count
    return out[:filled]


def _sample_cut(sample: Tensor, quantile: float) -> tuple[float, bool]:
    """(value, tied): the sample's ``quantile`` and whether that value is a tie (a mass of equal scores).

    The j-th of m sorted sample values has expected population rank
    ``j / (m + 1)``, so ``j = round(quantile * (m + 1))`` makes the reached
    sparsity unbiased. Tied means three copies or more in the sample: blocks are
    drawn with replacement, so one score can appear twice without any tie.
    ``sample`` is reordered.
    """
    m = sample.numel()
    j = min(m, max(1, round(quantile * (m + 1))))
    if sample.device.type != "cpu" or sample.dtype not in (torch.float32, torch.float64):
        value = _kth_value(sample, j)
        return value, int((sample == value).sum()) > 2
    array = sample.numpy()
    if array.min() == -np.inf:  # zero weights, ranked -inf: introselect slows ~8x on such a mass, so drop it
        lowest = int(np.count_nonzero(array == -np.inf))
        if j <= lowest:
            return float("-inf"), lowest > 2
        array, j = array[array != -np.inf], j - lowest
    array.partition(j - 1)
    value = float(array[j - 1])
    return value, int(np.count_nonzero(array == value)) > 2  # numpy: no bool tensor, one pass


def sampled_cut(scores: Sequence[Tensor], sparsity: float, *, size: int = 0, seed: int = 0) -> tuple[float, bool]:
    """(cut, tied): the global cut estimated from a sample of ``size`` scores (0: for a 0.1-point tolerance)."""
    total = sum(_sizes(scores))
    sample = sample_scores(scores, size or sample_size(sparsity), seed)
    return _sample_cut(sample, prune_count(total, sparsity) / total)


def sampled_value(scores: Sequence[Tensor], sparsity: float, *, size: int = 0, seed: int = 0) -> float:
    """The global cut estimated from a sample (what ``sampled`` prunes up to)."""
    return sampled_cut(scores, sparsity, size=size, seed=seed)[0]


def sampled_mask(scores: Sequence[Tensor], sparsity: float, *, size: int = 0, seed: int = 0) -> list[Tensor]:
    """Keep-masks from a global cut estimated on a random sample: ``score > cut`` keeps.

    ``size`` scores are sampled (0: ``sample_size(sparsity)``, a 0.1-point tolerance),
    so the reached sparsity is unbiased and its spread does not depend on the model's
    size. When the cut value is tied in the sample (a mass of equal
    scores, such as the zeros of already-pruned weights), ties are pruned in order up
    to the exact count, as ``exact`` does.
    """
    total = sum(_sizes(scores))
    k = prune_count(total, sparsity)
    trivial = _trivial(scores, k, total)
    if trivial is not None:
        return trivial
    value, tied = sampled_cut(scores, sparsity, size=size, seed=seed)
    if not tied:
        return [s > value for s in scores]
    below = sum(int((s < value).sum()) for s in scores)
    return _prune_ties(scores, value, k - below)


def per_layer_mask(scores: Sequence[Tensor], sparsity: float, *, seed: int = 0) -> list[Tensor]:
    """Each tensor pruned to ``sparsity`` on its own: exactly ``round(sparsity * n_i)`` entries of each."""
    return [global_exact_mask([s], sparsity)[0] for s in scores]


THRESHOLDS: dict[str, ThresholdFn] = {
    "exact": global_exact_mask,
    "sampled": sampled_mask,
    "per-layer": per_layer_mask,
}


def get_threshold(name: str, sample_tolerance: float = 0.1) -> ThresholdFn:
    """The threshold ``name`` (``sampled`` sized for ``sample_tolerance`` points); unknown names list the valid ones."""
    try:
        fn = THRESHOLDS[name]
        if fn is sampled_mask:
            return lambda scores, sparsity, *, seed=0: sampled_mask(
                scores, sparsity, size=sample_size(sparsity, sample_tolerance), seed=seed)
        return fn
    except KeyError:
        raise ConfigError(
            f"PRUNING_THRESHOLD='{name}' is unknown; valid: {', '.join(sorted(THRESHOLDS))}"
        ) from None
