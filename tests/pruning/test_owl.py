"""The ``owl`` distribution (lib/pruning/owl.py, lib/pruning/per_layer.py): outlier shares and densities worked by
hand on a small model, the overall count exact, kept across a checkpoint, offered for GPT-2 only, and a tiny
GPT run end to end (issue 32)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lib import config
from lib.core.errors import ConfigError, HarnessError
from lib.core.spec import PruneSettings
from lib.pruning import build_pruner
from lib.pruning.distribution import kept_counts, owl_densities
from lib.pruning.owl import block_of
from lib.pruning.threshold import prune_count
from tests.conftest import synthetic_spec, trained_run


class Blocks(nn.Module):
    """Three numbered blocks of one Linear each and an unnumbered head."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(3)])
        self.head = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.h:
            x = torch.relu(layer(x))
        return self.head(x)


def _model_and_batches() -> tuple[Blocks, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Blocks(), [torch.randn(5, 8) for _ in range(3)]


def _by_hand(model: Blocks, batches: list[torch.Tensor], m: float, lam: float, sparsity: float) -> list[float]:
    """OWL's densities computed directly: each layer's inputs, Wanda's scores, outlier shares per block."""
    shares = []
    for i, layer in enumerate([*model.h, model.head]):
        inputs = []
        for x in batches:
            for earlier in list(model.h)[:i]:
                x = torch.relu(earlier(x))
            inputs.append(x)
        norm = torch.cat(inputs).pow(2).sum(dim=0).sqrt()
        score = (layer.weight.abs() * norm).reshape(-1)
        shares.append(float((score > m * score.mean()).float().mean()))
    low, high = min(shares), max(shares)
    scaled = [(d - low) / (high - low) * 2 * lam for d in shares]
    sizes = [64, 64, 64, 32]
    mean = sum(s * n for s, n in zip(scaled, sizes, strict=True)) / sum(sizes)
    return [1 - sparsity + s - mean for s in scaled]


def test_owl_densities_follow_the_outlier_shares_worked_by_hand() -> None:
    model, batches = _model_and_batches()
    pruner = build_pruner(model, None, PruneSettings(method="magnitude", target=0.6, distribution="owl",
                                                     owl_m=2.0, owl_lambda=0.1))
    pruner.layered.calibration = (lambda: batches, model)
    pruner.set_total_steps(10)
    expected = _by_hand(model, batches, 2.0, 0.1, 0.6)  # on the weights before pruning, as OWL measures them
    with torch.no_grad():
        pruner.prune_to(0.6)
    assert [block_of(name) for name, _ in pruner.params] == ["h.0", "h.1", "h.2", "head.weight"]
    got = [1 - entry["target"] for entry in pruner.layer_report()["layers"].values()]
    sizes = [64, 64, 64, 32]
    assert got == pytest.approx(expected, abs=1.0 / min(sizes) + 1e-9)  # whole weights per layer
    assert len({round(d, 6) for d in expected}) == 3  # the blocks differ (two of them tie here)
    assert max(expected) - min(expected) == pytest.approx(0.2)  # sparsities span 2 x lambda
    assert sum(int((p == 0).sum()) for _, p in pruner.params) == prune_count(224, 0.6)


def test_owl_densities_stay_in_range_and_every_count_is_exact() -> None:
    deviations = [0.3, -0.1, -0.1, -0.05]
    for sparsity in (0.1, 0.5, 0.97):
        densities = owl_densities(deviations, sparsity)
        assert all(0.0 <= d <= 1.0 for d in densities)
        shapes = [(100,), (100,), (100,), (200,)]
        assert sum(kept_counts("owl", shapes, sparsity, deviations=deviations)) == 500 - prune_count(500, sparsity)
    assert owl_densities(deviations, 0.97)[0] == pytest.approx(0.03 + 0.3 * 0.03 / 0.1)  # shrunk: 0.03 - 0.1 t >= 0


def test_the_measured_deviations_are_kept_in_the_checkpoint_and_calibration_is_required() -> None:
    model, batches = _model_and_batches()
    settings = PruneSettings(method="magnitude", target=0.5, distribution="owl", owl_m=2.0)
    pruner = build_pruner(model, None, settings)
    pruner.layered.calibration = (lambda: batches, model)
    with torch.no_grad():
        pruner.prune_to(0.3)
    state = pruner.state_dict()
    assert len(state["owl_deviations"]) == 4
    again = build_pruner(model, None, settings)  # a resumed run: no calibration given, none needed
    again.load_state_dict(state)
    with torch.no_grad():
        again.prune_to(0.5)
    assert again.layered.deviations == pruner.layered.deviations
    fresh = build_pruner(Blocks(), None, settings)
    with pytest.raises(HarnessError, match="the owl distribution needs calibration text"):
        fresh.prune_to(0.5)


def test_owl_is_offered_for_gpt2_only_and_its_settings_are_checked(make_config) -> None:
    base = 'CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="0.5"\n'
    with pytest.raises(ConfigError, match="CONFIG_SPARSITY_DISTRIBUTION_OWL=y has no effect: it depends on"):
        config.load(make_config("CONFIG_MODEL_LENET5=y\n" + base, "CONFIG_SPARSITY_DISTRIBUTION_OWL=y\n"))
    gpt2 = "CONFIG_MODEL_GPT2=y\n" + base + "CONFIG_SPARSITY_DISTRIBUTION_OWL=y\n"
    prune = config.load(make_config(gpt2 + 'CONFIG_OWL_M="3"\nCONFIG_OWL_CALIBRATION_BATCHES=4\n')).prune
    assert (prune.distribution, prune.owl_m, prune.owl_lambda, prune.owl_batches) == ("owl", 3.0, 0.08, 4)
    for line, message in (('CONFIG_OWL_M="0"\n', "CONFIG_OWL_M"), ('CONFIG_OWL_LAMBDA="0.5"\n', "CONFIG_OWL_LAMBDA")):
        with pytest.raises(ConfigError, match=message):
            config.load(make_config(gpt2 + line))


def test_a_tiny_gpt_run_with_owl_reaches_the_exact_count_with_per_block_targets(tmp_path: Path) -> None:
    spec = synthetic_spec(tmp_path, name="owl", max_iters=12, eval_interval=6)
    spec = dataclasses.replace(spec, prune=PruneSettings(method="magnitude", target=0.6, start=4, end=8, frequency=2,
                                                         distribution="owl", owl_m=3.0, owl_batches=2))
    summary = json.loads((trained_run(tmp_path, spec) / "summary.json").read_text())
    entry = summary["sparsity"]
    total = entry["prunable_params"]
    assert entry["reached"] == prune_count(total, 0.6) / total and not summary["flags"]
    assert entry["distribution"] == "owl" and entry["owl"]["m"] == 3.0
    targets = {name: layer["target"] for name, layer in entry["layers"].items()}
    by_block: dict[str, set[float]] = {}
    for name, target in targets.items():
        by_block.setdefault(block_of(name), set()).add(round(target, 2))
    assert len(by_block) == 4 and all(len(v) == 1 for v in by_block.values())  # one target per block
    assert max(targets.values()) - min(targets.values()) == pytest.approx(0.16, abs=0.02)  # 2 x lambda
    assert all(math.isclose(layer["reached"], layer["target"]) for layer in entry["layers"].values())
