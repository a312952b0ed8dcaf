"""lib/pruning/distribution.py: per-layer sparsity distributions (issue 32). ERK's densities are RigL's formula
on LeNet-5, every distribution prunes exactly round(s * N) weights, and the rounding rule is the stated one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lenet5.model import LeNet5
from lib import config
from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings
from lib.optim import build_optimizer
from lib.pruning import build_pruner, prunable_parameters
from lib.pruning.distribution import erk_densities, kept_counts
from lib.pruning.threshold import prune_count
from lib.train import run as run_mod
from tests.conftest import tiny_spec


def lenet_shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for _, p in prunable_parameters(LeNet5(num_classes=10))]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_erk_densities_are_rigls_formula_on_lenet5(sparsity: float) -> None:
    """RigL's ERK: density = eps * sum(shape) / prod(shape) for every layer not capped at 1, the capped ones
    those with the largest ratio, and the kept weights add up to (1 - s) N."""
    shapes = lenet_shapes()
    assert shapes == [(6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    sizes = [math.prod(s) for s in shapes]
    ratio = [sum(s) / math.prod(s) for s in shapes]
    density = erk_densities(shapes, sparsity)
    free = [i for i, d in enumerate(density) if d < 1.0]
    eps = {density[i] / ratio[i] for i in free}
    assert max(eps) - min(eps) < 1e-12 * max(eps)  # one eps for every layer not capped
    assert all(ratio[i] >= max(ratio[j] for j in free) for i, d in enumerate(density) if d == 1.0)
    assert sum(d * n for d, n in zip(density, sizes, strict=True)) == pytest.approx((1 - sparsity) * sum(sizes))
    if sparsity == 0.9:  # no layer capped: eps is the closed form K / sum(ratio x size) = 6147 / 867
        assert free == [0, 1, 2, 3, 4] and min(eps) == pytest.approx(6147 / 867)
    if sparsity == 0.5:  # the first convolution and the classifier would exceed 1: kept dense
        assert [i for i, d in enumerate(density) if d == 1.0] == [0, 4]


def test_the_rounding_gives_the_remainder_to_the_largest_layers() -> None:
    assert kept_counts("uniform", [(10,), (7,), (3,)], 0.5) == [6, 3, 1]  # floors 5, 3, 1; one left: to the 10
    assert kept_counts("uniform", [(3,), (7,), (7,)], 0.5) == [1, 4, 4]  # floors 1, 3, 3; two left: the 7s
    assert sum(kept_counts("erk", lenet_shapes(), 0.9)) == 61470 - prune_count(61470, 0.9)


@pytest.mark.parametrize("kind", ["global", "uniform", "erk"])
@pytest.mark.parametrize("method", ["magnitude", "state"])
def test_every_distribution_prunes_exactly_the_overall_count(kind: str, method: str) -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10)
    optimizer = build_optimizer(model, OptimSettings("adamwprune" if method == "state" else "adamw", 1e-3, 0.0,
                                                     base="adamw" if method == "state" else ""))
    pruner = build_pruner(model, optimizer, PruneSettings(method=method, target=0.97, distribution=kind,
                                                          variant="bitter7" if method == "state" else ""))
    shapes = [p.shape for _, p in pruner.params]
    for sparsity in (0.3, 0.9, 0.97):
        pruner.prune_to(sparsity)
        zeros = [int((p == 0).sum()) for _, p in pruner.params]
        assert sum(zeros) == prune_count(61470, sparsity)
        if kind != "global":
            assert zeros == [math.prod(s) - k for s, k in zip(shapes, kept_counts(kind, shapes, sparsity),
                                                                 strict=True)]


def test_an_erk_run_trains_to_its_per_layer_targets(tmp_path: Path) -> None:
    spec = tiny_spec("erk", pruning="magnitude", sparsity=0.9, max_iters=12)
    spec = dataclasses.replace(spec, prune=dataclasses.replace(spec.prune, distribution="erk"))
    run_dir = tmp_path / "erk"
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert run_mod.run(run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sparsity"]["reached"] == prune_count(61470, 0.9) / 61470 and not summary["flags"]
    layers = summary["sparsity"]["layers"]
    wanted = kept_counts("erk", lenet_shapes(), 0.9)
    assert [round(entry["target"] * n) for entry, n in zip(layers.values(), map(math.prod, lenet_shapes()),
                                                           strict=True)] == [math.prod(s) - k for s, k in
                                                                             zip(lenet_shapes(), wanted, strict=True)]
    assert all(entry["reached"] == entry["target"] for entry in layers.values())


def test_a_per_layer_distribution_is_offered_only_where_it_can_act(make_config) -> None:
    """Kconfig hides the per-layer members without the exact threshold, and the whole choice without a method
    that uses it (so randconfig stays valid); a hand-edited line asking for one anyway is one line."""
    for base, line in (("CONFIG_PRUNING_MAGNITUDE=y\n", "CONFIG_SPARSITY_DISTRIBUTION_ERK=y\n"
                                                        "CONFIG_PRUNING_THRESHOLD_SAMPLED=y\n"),
                       ("CONFIG_PRUNING_NONE=y\n", "CONFIG_SPARSITY_DISTRIBUTION_UNIFORM=y\n")):
        with pytest.raises(ConfigError, match="=y has no effect: it depends on"):
            config.load(make_config(base, line))
    assert config.load(make_config("CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_SPARSITY_DISTRIBUTION_ERK=y\n")
                       ).prune.distribution == "erk"
    assert config.load(make_config("CONFIG_PRUNING_NONE=y\n")).prune.distribution == "global"
