"""Movement pruning, importance metrics and the sampled / per-layer thresholds."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings
from lib.optim import build_optimizer
from lib.pruning import PRUNERS, build_pruner
from lib.pruning.threshold import (
    THRESHOLDS,
    LazyScores,
    per_layer_mask,
    prune_count,
    sampled_mask,
    sampled_value,
)
from tests.conftest import SmallConvNet as Net

# A 2x2 weight, three SGD steps (lr 0.1) with these gradients: the worked example below.
W1 = [[1.0, -2.0], [0.5, 3.0]]
GRADS = [[[1.0, 1.0], [-1.0, 2.0]], [[2.0, -1.0], [0.0, 1.0]], [[-1.0, 0.0], [4.0, 1.0]]]
# w2 = w1 - 0.1 g1 = [[0.9, -2.1], [0.6, 2.8]];  w3 = w2 - 0.1 g2 = [[0.7, -2.0], [0.6, 2.7]]


def tiny(settings: PruneSettings) -> tuple[nn.Linear, torch.optim.Optimizer, object]:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W1))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    pruner = build_pruner(layer, opt, settings)
    pruner.set_total_steps(100)
    return layer, opt, pruner


def sgd_step(layer: nn.Linear, opt: torch.optim.Optimizer, pruner, step: int, after: bool = True) -> None:
    layer.weight.grad = torch.tensor(GRADS[step - 1])
    pruner.before_step()
    opt.step()
    if after:
        pruner.after_step(step)


def test_movement_sanh_accumulates_minus_w_times_g_from_step_1() -> None:
    layer, opt, pruner = tiny(PruneSettings("movement", target=0.5, start=10, end=20))
    for step in (1, 2, 3):
        sgd_step(layer, opt, pruner, step)
    # -w1*g1 = [[-1, 2], [0.5, -6]]; -w2*g2 = [[-1.8, -2.1], [0, -2.8]]; -w3*g3 = [[0.7, 0], [-2.4, -2.7]]
    expected = torch.tensor([[-2.1, -0.1], [-1.9, -11.5]])
    assert torch.allclose(pruner.importance("weight", layer.weight), expected, atol=1e-5)
    assert pruner.buffer_bytes() == 4 * 4  # one float32 score per weight, no mask yet
    pruner.prune_to(0.5)  # the two lowest scores: (1, 1) and (0, 0)
    assert pruner.mask("weight").tolist() == [[False, True], [True, False]]
    assert pruner.buffer_bytes() == 4 * 4 + 1  # plus a bit-packed mask
    assert layer.weight[0, 0] == 0 and layer.weight[1, 1] == 0
    # The next step: pruned gradients are zeroed, but only after the score has seen them.
    layer.weight.grad = torch.ones(2, 2)
    before = pruner.scores["weight"].clone()
    pruner.before_step()
    w = layer.weight.detach()
    assert torch.allclose(pruner.scores["weight"], before - w)  # pruned w = 0: their scores stay put
    assert layer.weight.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_movement_knlp_scores_movement_since_pruning_start() -> None:
    layer, opt, pruner = tiny(PruneSettings("movement", target=0.5, start=2, end=2, movement_form="knlp"))
    sgd_step(layer, opt, pruner, 1)
    assert not pruner.w0 and pruner.buffer_bytes() == 0  # nothing held before pruning starts
    sgd_step(layer, opt, pruner, 2, after=False)  # w0 = w2, taken before step 2's update
    assert torch.allclose(pruner.w0["weight"], torch.tensor([[0.9, -2.1], [0.6, 2.8]]))
    # w3 * (w3 - w2) = [[0.7 * -0.2, -2.0 * 0.1], [0.6 * 0, 2.7 * -0.1]]
    expected = torch.tensor([[-0.14, -0.2], [0.0, -0.27]])
    assert torch.allclose(pruner.importance("weight", layer.weight), expected, atol=1e-5)
    pruner.after_step(2)
    assert pruner.mask("weight").tolist() == [[True, False], [True, False]]


def test_gradient_sensitivity_accumulates_abs_w_times_g() -> None:
    settings = PruneSettings("magnitude", target=0.5, start=10, end=20, importance="gradient-sensitivity")
    layer, opt, pruner = tiny(settings)
    sgd_step(layer, opt, pruner, 1)
    sgd_step(layer, opt, pruner, 2)
    # |w1*g1| = [[1, 2], [0.5, 6]];  |w2*g2| = [[1.8, 2.1], [0, 2.8]]
    expected = torch.tensor([[2.8, 4.1], [0.5, 8.8]])
    assert torch.allclose(pruner.importance("weight", layer.weight), expected, atol=1e-5)
    assert pruner.buffer_bytes() == 4 * 4


def test_activation_metric_linear_running_mean_per_input_feature() -> None:
    layer = nn.Linear(3, 2, bias=False)
    pruner = build_pruner(layer, None, PruneSettings("magnitude", target=0.5, importance="activation"))
    layer(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]]))
    layer(torch.tensor([[-1.0, 1.0, 1.0]]))
    mean = torch.tensor([5 / 3, 1.0, 2 / 3])  # mean |x| of each input feature over the 3 rows
    w = layer.weight.detach()
    assert torch.allclose(pruner.importance("weight", layer.weight), w.abs() * mean)
    layer.eval()
    layer(torch.full((1, 3), 100.0))  # evaluation does not count
    layer.train()
    pruner.close()
    layer(torch.full((1, 3), 100.0))  # nor does anything after close(): the hooks are gone
    assert torch.allclose(pruner.importance("weight", layer.weight), w.abs() * mean)
    assert not layer._forward_pre_hooks
    assert pruner.buffer_bytes() == 3 * 4  # one float per input unit, no mask yet


@pytest.mark.parametrize("groups", [1, 2])
def test_activation_metric_conv_per_input_channel(groups: int) -> None:
    conv = nn.Conv2d(4, 2, 1, groups=groups, bias=False)
    pruner = build_pruner(conv, None, PruneSettings("magnitude", target=0.5, importance="activation"))
    x = torch.stack([torch.full((2, 2), float(c + 1)) for c in range(4)]).unsqueeze(0)  # channel c holds c+1
    x[0, 1] *= -1
    conv(x)
    w = conv.weight.detach()
    if groups == 1:
        scale = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    else:  # output 0 reads channels 0-1, output 1 reads channels 2-3
        scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    assert torch.allclose(pruner.importance("weight", conv.weight), w.abs() * scale)


def test_unknown_names_are_config_errors() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="activation, gradient-sensitivity, magnitude"):
        build_pruner(layer, None, PruneSettings("magnitude", importance="fisher"))
    with pytest.raises(ConfigError, match="knlp, sanh"):
        build_pruner(layer, None, PruneSettings("movement", movement_form="paper"))
    assert {"exact", "sampled", "per-layer"} <= set(THRESHOLDS) and "movement" in PRUNERS


# -- thresholds -------------------------------------------------------------------------------------


def mixed_scores(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Tensors of different sizes and distributions: a sampler that over-weights one is biased."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n // 2, generator=gen).abs().view(-1, 100),
        torch.rand(n // 4, generator=gen) * 3,
        torch.randn(n // 8, generator=gen) ** 2,
        torch.empty(n // 8).exponential_(generator=gen).view(-1, 10) * 0.5,
    ]


def test_sampled_threshold_is_unbiased_over_40_draws() -> None:
    # ~2M scores, half of them sampled (blocks of 64 neighbours, stratified by tensor).
    scores = mixed_scores(2_000_000)
    ordered = torch.cat([s.flatten() for s in scores]).sort().values  # reached sparsity = rank of the cut
    errors = []
    for seed in range(40):
        cut = sampled_value(scores, 0.9, size=1_000_000, seed=seed)
        reached = int(torch.searchsorted(ordered, torch.tensor([cut]), right=True)) / ordered.numel()
        errors.append(100 * (reached - 0.9))  # percentage points
    assert abs(statistics.mean(errors)) <= 0.02
    assert max(abs(e) for e in errors) <= 0.1
    assert statistics.pstdev(errors) > 0  # really random


def test_sampled_masks_are_deterministic_per_seed_and_near_target() -> None:
    scores = mixed_scores(400_000, seed=1)
    a = sampled_mask(scores, 0.6, size=20_000, seed=7)
    b = sampled_mask([s.clone() for s in scores], 0.6, size=20_000, seed=7)
    c = sampled_mask(scores, 0.6, size=20_000, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    pruned = sum(int((~m).sum()) for m in a) / 400_000
    assert pruned == pytest.approx(0.6, abs=0.005)
    # score > cut keeps: every pruned score is <= every kept one
    flat_s, flat_m = torch.cat([s.flatten() for s in scores]), torch.cat([m.flatten() for m in a])
    assert flat_s[~flat_m].max() <= flat_s[flat_m].min()


def test_sampled_reads_lazy_scores_once_per_tensor_and_samples_through_gather() -> None:
    scores = mixed_scores(200_000, seed=2)
    computed: list[int] = []

    def compute(i: int) -> torch.Tensor:
        computed.append(i)
        return scores[i].clone()

    sizes = [s.numel() for s in scores]
    lazy = LazyScores(compute, sizes, gather=lambda i, idx: scores[i].reshape(-1)[idx], device=torch.device("cpu"))
    masks = sampled_mask(lazy, 0.4, size=100_000, seed=5)
    assert computed == [0, 1, 2, 3]  # the sample came through gather; each tensor was made once, for its mask
    assert all(torch.equal(a, b) for a, b in zip(masks, sampled_mask(scores, 0.4, size=100_000, seed=5), strict=True))


def test_sampled_resolves_a_tied_cut_to_the_exact_count() -> None:
    scores = [torch.zeros(300, 100), torch.rand(70_000, generator=torch.Generator().manual_seed(0))]
    masks = sampled_mask(scores, 0.2, size=2_000, seed=3)  # the cut falls inside the 30 % of zeros
    assert sum(int((~m).sum()) for m in masks) == prune_count(100_000, 0.2)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.9])
def test_per_layer_prunes_each_tensor_exactly(sparsity: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 3, generator=gen), torch.rand(50, generator=gen) * 100, torch.zeros(4, 5)]
    masks = per_layer_mask(scores, sparsity)
    for s, m in zip(scores, masks, strict=True):
        assert m.shape == s.shape and m.dtype == torch.bool
        assert int((~m).sum()) == prune_count(s.numel(), sparsity)


# -- every new method during training ---------------------------------------------------------------



METHODS = {
    "movement-sanh": PruneSettings("movement"),
    "movement-knlp": PruneSettings("movement", movement_form="knlp"),
    "gradient-sensitivity": PruneSettings("magnitude", importance="gradient-sensitivity"),
    "activation": PruneSettings("magnitude", importance="activation"),
    "sampled": PruneSettings("magnitude", threshold="sampled"),
    "per-layer": PruneSettings("magnitude", threshold="per-layer"),
}
OPTIMS = {
    # SGD's usual weight decay: with a strong one (0.1), knlp's w * (w - w0) ~ -decay * w^2 prunes the
    # largest weights first; here that kills most conv channels and dead units keep zero weights alive
    # in the masks, so the measured sparsity overshoots the target (a property of knlp, not of masking).
    "sgd": OptimSettings("sgd", lr=0.05, weight_decay=5e-4, momentum=0.9),
    "adamw": OptimSettings("adamw", lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("optim", list(OPTIMS))
@pytest.mark.parametrize("method", list(METHODS))
def test_method_reaches_target_and_keeps_pruned_weights_zero(method: str, optim: str) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, OPTIMS[optim])
    settings = METHODS[method].__class__(
        **{**METHODS[method].__dict__, "target": 0.7, "start": 5, "end": 30, "frequency": 5}
    )
    pruner = build_pruner(model, opt, settings)
    pruner.set_total_steps(40)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 41):
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.before_step()
        opt.step()
        pruner.after_step(step)
        for name, param in pruner.params:
            mask = pruner.mask(name)
            if mask is None:
                continue
            assert bool((param[~mask] == 0).all()), (step, name)
            for value in opt.state[param].values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    assert bool((value[~mask] == 0).all()), (step, name)
    assert pruner.sparsity() == pytest.approx(0.7, abs=0.005)
    pruner.close()
