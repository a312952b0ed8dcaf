"""Prunable tensors, the exact global threshold, and the none / magnitude pruners."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings
from lib.optim import build_optimizer
from lib.optim.bitmask import packed_size
from lib.pruning import PRUNERS, build_pruner, prunable_parameters
from lib.pruning.threshold import global_exact_mask, prune_count
from tests.conftest import small_conv_net as make


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)
    ]


OPTIMS = {
    "sgd": OptimSettings("sgd", lr=0.05, weight_decay=0.1, momentum=0.9),
    "sgd-nesterov": OptimSettings("sgd", lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=True),
    "adam": OptimSettings("adam", lr=1e-2, weight_decay=0.1),
    "adamw": OptimSettings("adamw", lr=1e-2, weight_decay=0.1),
}


# -- prunable tensors ---------------------------------------------------------------------------


def test_prunable_are_linear_and_conv_weights_without_tied_head() -> None:
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 6),
            "c1": nn.Conv1d(6, 6, 3),
            "c3": nn.Conv3d(2, 2, 1),
            "norm": nn.LayerNorm(6),
            "fc": nn.Linear(6, 6),
            "head": nn.Linear(6, 10, bias=False),
        }
    )
    model["head"].weight = model["embed"].weight
    names = [name for name, _ in prunable_parameters(model)]
    assert names == ["c1.weight", "c3.weight", "fc.weight"]


def test_shared_linear_weight_listed_once() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    assert [name for name, _ in prunable_parameters(nn.Sequential(a, b))] == ["0.weight"]


# -- exact threshold -----------------------------------------------------------------------------


def pruned(masks: list[torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9, 0.99])
def test_exact_count_over_tensors_of_different_shapes(sparsity: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = [
        torch.rand(7, 3, generator=gen),
        torch.rand(50, generator=gen),
        torch.rand(2, 3, 4, 5, generator=gen),
    ]
    masks = global_exact_mask(scores, sparsity)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert all(m.dtype == torch.bool for m in masks)
    assert pruned(masks) == prune_count(21 + 50 + 120, sparsity)
    # Every pruned score is <= every kept score.
    flat_s, flat_m = torch.cat([s.flatten() for s in scores]), torch.cat([m.flatten() for m in masks])
    if 0 < sparsity:
        assert flat_s[~flat_m].max() <= flat_s[flat_m].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6, 0.95])
def test_exact_count_with_many_ties(sparsity: float) -> None:
    scores = [torch.zeros(10, 10), torch.ones(30), torch.zeros(3, 5), torch.full((20,), 0.5)]
    masks = global_exact_mask(scores, sparsity)
    assert pruned(masks) == prune_count(165, sparsity)
    again = global_exact_mask([s.clone() for s in scores], sparsity)
    # Ties are broken the same way every time.
    assert all(torch.equal(a, b) for a, b in zip(masks, again, strict=True))


def test_ties_pruned_in_tensor_then_index_order() -> None:
    masks = global_exact_mask([torch.zeros(2, 3), torch.zeros(4)], 0.7)  # k = 7 of 10
    assert masks[0].flatten().tolist() == [False] * 6
    assert masks[1].tolist() == [False, True, True, True]


def test_sparsity_zero_keeps_all() -> None:
    masks = global_exact_mask([torch.zeros(4, 4), torch.rand(3)], 0.0)
    assert all(bool(m.all()) for m in masks)


# -- magnitude pruner during training -----------------------------------------------------------


def train_and_check(optim: OptimSettings, **options: object) -> None:
    model = make()
    opt = build_optimizer(model, optim, **options)
    pruner = build_pruner(model, opt, PruneSettings("magnitude", target=0.7, start=5, end=30, frequency=5))
    pruner.set_total_steps(60)
    assert pruner.reaches_target()
    updates = 0
    for step, (x, y) in enumerate(batches(60), start=1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.before_step()
        opt.step()
        before = {name: p.detach().abs().clone() for name, p in pruner.params}
        pruner.after_step(step)
        if pruner.schedule.should_update(step):
            updates += 1
            check_lowest_pruned(pruner, before, pruner.scheduled_sparsity(step))
        check_pruned_stay_zero(pruner, opt)
    assert updates == 6
    assert pruner.sparsity() == pytest.approx(0.70, abs=0.005)
    assert pruner.buffer_bytes() == sum(packed_size(p.numel()) for _, p in pruner.params)  # 1 bit per weight


def check_lowest_pruned(pruner, before: dict[str, torch.Tensor], sparsity: float) -> None:
    scores = torch.cat([before[name].flatten() for name, _ in pruner.params])
    keep = torch.cat([pruner.mask(name).flatten() for name, _ in pruner.params])
    assert int((~keep).sum()) == prune_count(pruner.prunable_count(), sparsity)
    if (~keep).any():
        assert scores[~keep].max() <= scores[keep].min()


def check_pruned_stay_zero(pruner, opt: torch.optim.Optimizer) -> None:
    for name, param in pruner.params:
        mask = pruner.mask(name)
        if mask is None:
            continue
        assert bool((param[~mask] == 0).all()), name
        state = opt.state[param]
        entries = [k for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if k in state]
        assert entries, f"no optimizer state for {name}"
        for key in entries:
            assert bool((state[key][~mask] == 0).all()), f"{name} {key}"


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_magnitude_pruning_reaches_target_and_keeps_zeros(optim: str) -> None:
    train_and_check(OPTIMS[optim])


def test_masking_holds_with_the_fused_step() -> None:
    train_and_check(OPTIMS["adamw"], fused=True)


def test_update_zeros_amsgrad_state_too() -> None:
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    pruner = build_pruner(model, opt, PruneSettings("magnitude", target=0.5, start=1, end=1, frequency=1))
    pruner.set_total_steps(5)
    for step, (x, y) in enumerate(batches(5), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.before_step()
        opt.step()
        pruner.after_step(step)
        for name, param in pruner.params:
            assert bool((opt.state[param]["max_exp_avg_sq"][~pruner.mask(name)] == 0).all())


def test_final_target_applied_even_when_end_step_is_skipped() -> None:
    model = make()
    pruner = build_pruner(model, None, PruneSettings("magnitude", target=0.5, start=0, end=0, frequency=10))
    pruner.set_total_steps(10)
    pruner.after_step(1)  # step 0 is never seen by after_step (steps are 1-based)
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_fractional_schedule_and_unreachable_target() -> None:
    settings = PruneSettings("magnitude", target=0.5, start=0.1, end=0.5, frequency=3)
    pruner = build_pruner(make(), None, settings)
    pruner.set_total_steps(200)
    assert pruner.schedule.steps() == (20, 100) and pruner.reaches_target()
    late = build_pruner(make(), None, PruneSettings("magnitude", target=0.5, start=10, end=300, frequency=3))
    late.set_total_steps(200)
    assert not late.reaches_target()


def test_state_dict_round_trip() -> None:
    model = make()
    pruner = build_pruner(model, None, PruneSettings("magnitude", target=0.6, start=0, end=4, frequency=2))
    pruner.set_total_steps(10)
    for step in range(1, 5):
        pruner.after_step(step)
    restored = build_pruner(model, None, PruneSettings("magnitude", target=0.6, start=0, end=4, frequency=2))
    restored.load_state_dict(pruner.state_dict())
    assert restored.step == 4 and restored.applied == 0.6
    assert all(torch.equal(pruner.masks[n], restored.masks[n]) for n in pruner.masks)


# -- the none pruner and the registry -----------------------------------------------------------


def test_none_pruner_is_bit_identical_to_plain_training() -> None:
    results = []
    for use_pruner in (False, True):
        model = make()
        opt = build_optimizer(model, OPTIMS["adamw"])
        pruner = build_pruner(model, opt, PruneSettings("none")) if use_pruner else None
        if pruner:
            pruner.set_total_steps(20)
        for step, (x, y) in enumerate(batches(20), start=1):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if pruner:
                pruner.before_step()
            opt.step()
            if pruner:
                pruner.after_step(step)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_none_pruner_still_measures_zeros() -> None:
    model = make()
    pruner = build_pruner(model, None, PruneSettings("none"))
    assert pruner.sparsity() == 0.0 and pruner.buffer_bytes() == 0
    with torch.no_grad():
        model.fc1.weight[:16].zero_()
    assert pruner.sparsity() == pytest.approx(16 * 144 / pruner.prunable_count())


def test_unknown_pruner_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_pruner(make(), None, PruneSettings("lottery"))
    assert ", ".join(sorted(PRUNERS)) in str(info.value)


def test_unknown_threshold_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="exact"):
        build_pruner(make(), None, PruneSettings("magnitude", target=0.5, threshold="topk"))


def test_masks_only_grow_even_when_pruned_weights_score_highest():
    """A pruned weight gets no gradient; reviving it would leave a 'kept' zero and overshoot the target."""
    from lib.core.spec import PruneSettings
    from lib.pruning.magnitude import MagnitudePruner

    class Inverted(MagnitudePruner):  # zeros score highest: the worst case for revival
        def importance(self, name, param):
            return torch.where(param == 0, torch.full_like(param, 1e9), param.abs())

    model = make(0)
    pruner = Inverted(model, None, PruneSettings("magnitude", target=0.8, start=0, end=1, frequency=1))
    pruner.set_total_steps(10)
    pruner.prune_to(0.4)
    first = {name: pruner.mask(name).clone() for name, _ in pruner.params}
    pruner.prune_to(0.8)
    for name, _ in pruner.params:
        assert not (pruner.mask(name) & ~first[name]).any(), "a pruned weight was revived"
    assert abs(pruner.sparsity() - 0.8) < 1e-3
