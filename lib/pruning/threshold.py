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

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from lib.errors import ConfigError

ThresholdFn = Callable[..., list[Tensor]]  # (scores, sparsity, *, seed=0) -> keep-masks
MIN_SAMPLE = 1 << 16  # smallest expected sample ``sampled`` draws (sampling error ~0.2 points)


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
    if x.device.type != "cpu":
        return x.kthvalue(j).values.item()
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
    sizes = _sizes(scores)
    total = sum(sizes)
    k = prune_count(total, sparsity)
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


def _bernoulli_positions(n: int, fraction: float, gen: torch.Generator, device: torch.device) -> Tensor:
    """Sorted positions in ``[0, n)``, each included independently with probability ``fraction``.

    Drawn as geometric gaps (``P(gap > t) = (1 - fraction)^t``) and summed, so
    they come out sorted: the gather then walks memory forward, with no sort.
    """
    if fraction >= 1.0:
        return torch.arange(n, device=device)
    scale = 1.0 / math.log1p(-fraction)
    expected = fraction * n
    chunks, last = [], -1
    while last < n:
        count = int(expected + 6 * math.sqrt(expected) + 16)  # enough to pass n almost always
        # log(1 - u) with u in [0, 1) is finite (torch's log1p of negatives is slow on the CPU).
        u = torch.rand(count, generator=gen, device=device)
        gaps = u.neg_().add_(1.0).log_().mul_(scale).floor_().to(torch.int64).add_(1)
        pos = gaps.cumsum_(0).add_(last)
        chunks.append(pos)
        last = int(pos[-1])
    pos = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return pos[: int((pos < n).sum())]


def sample_scores(scores: Sequence[Tensor], fraction: float, seed: int) -> Tensor:
    """A Bernoulli(``fraction``) sample of all scores, gathered tensor by tensor (never concatenated).

    Every score is in the sample with the same probability, so each tensor
    contributes in proportion to its size and the sample's quantiles are
    unbiased. The positions are drawn once over the virtual concatenation
    (a handful of large ops rather than many small ones per tensor) and cut
    at the tensor boundaries. The generator is seeded with ``seed`` only:
    every rank that holds the same scores draws the same sample. At least
    about ``MIN_SAMPLE`` scores are drawn (all of them for small models), so
    the sampled cut stays within ~0.2 points of the target on any model.
    """
    if not fraction > 0:
        raise ValueError(f"sample fraction {fraction} must be > 0")
    sizes = _sizes(scores)
    total = sum(sizes)
    fraction = max(fraction, MIN_SAMPLE / max(1, total))
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    lazy = isinstance(scores, LazyScores)
    device = scores.device if lazy and scores.device is not None else scores[0].device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    pos = _bernoulli_positions(total, fraction, gen, device)
    cuts = torch.searchsorted(pos, torch.tensor(starts, device=device)).tolist()
    parts = []
    for i in range(len(sizes)):
        mine = pos[cuts[i]:cuts[i + 1]].sub_(starts[i])
        parts.append(scores.take(i, mine) if lazy else scores[i].reshape(-1)[mine])
    return torch.cat(parts) if parts else torch.empty(0, device=device)


def _sample_cut(sample: Tensor, quantile: float) -> tuple[float, bool]:
    """(value, tied): the sample's ``quantile`` and whether the sample holds that value twice or more.

    The j-th of m sorted sample values has expected population rank
    ``j / (m + 1)``, so ``j = round(quantile * (m + 1))`` makes the reached
    sparsity unbiased. ``sample`` is reordered.
    """
    m = sample.numel()
    j = min(m, max(1, round(quantile * (m + 1))))
    value = _kth_value(sample, j)
    return value, int((sample == value).sum()) > 1


def sampled_value(scores: Sequence[Tensor], sparsity: float, *, fraction: float = 0.02, seed: int = 0) -> float:
    """The global cut estimated from a ``fraction`` sample (what ``sampled`` prunes up to)."""
    total = sum(_sizes(scores))
    return _sample_cut(sample_scores(scores, fraction, seed), prune_count(total, sparsity) / total)[0]


def sampled_mask(
    scores: Sequence[Tensor], sparsity: float, *, fraction: float = 0.02, seed: int = 0
) -> list[Tensor]:
    """Keep-masks from a global cut estimated on a random sample: ``score > cut`` keeps.

    The reached sparsity is unbiased and off the target by about
    ``sqrt(s (1 - s) / (fraction * N))`` (0.03 points at 2 % of 124M scores).
    When the cut value is tied in the sample (a mass of equal scores, such as
    the zeros of already-pruned weights), ties are pruned in order up to the
    exact count, as ``exact`` does. With no sample drawn it falls back to ``exact``.
    """
    total = sum(_sizes(scores))
    k = prune_count(total, sparsity)
    trivial = _trivial(scores, k, total)
    if trivial is not None:
        return trivial
    sample = sample_scores(scores, fraction, seed)
    if sample.numel() == 0:
        return global_exact_mask(scores, sparsity)
    value, tied = _sample_cut(sample, k / total)
    del sample
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


def get_threshold(name: str, sample_fraction: float = 0.02) -> ThresholdFn:
    """The threshold function ``name``, ``sampled`` bound to ``sample_fraction``; unknown names list the valid ones."""
    try:
        fn = THRESHOLDS[name]
        return functools.partial(fn, fraction=sample_fraction) if fn is sampled_mask else fn
    except KeyError:
        raise ConfigError(
            f"PRUNING_THRESHOLD='{name}' is unknown; valid: {', '.join(sorted(THRESHOLDS))}"
        ) from None
