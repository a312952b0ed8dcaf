"""Wanda (lib/pruning/importance.py) and SparseGPT (lib/pruning/sparsegpt.py) against their definitions on small
layers (issue 32): Wanda's scores by hand and its per-row comparison; SparseGPT's update for one pruned weight
equal to optimal brain surgeon's closed form, and its reconstruction error below magnitude's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib.core.spec import PruneSettings
from lib.pruning import build_pruner
from lib.pruning.nm import is_exactly_nm, keep_mask
from lib.pruning.sparsegpt import DAMP, SparseGPT, hessian, reconstruct
from lib.pruning.threshold import exact_count_mask, prune_count


def test_wanda_scores_are_w_times_the_input_norm_and_each_row_keeps_its_share() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    x = torch.randn(3, 5, 6) * torch.tensor([0.1, 5.0, 1.0, 0.5, 2.0, 0.01])
    model = nn.Sequential(layer)
    pruner = build_pruner(model, None, PruneSettings(method="magnitude", importance="wanda"))
    model.train()
    model(x[:2])
    model(x[2:])  # two calibration batches: the norm runs over every token of both
    w = layer.weight.detach().clone()
    norms = [math.sqrt(sum(float(x[b, t, j]) ** 2 for b in range(3) for t in range(5))) for j in range(6)]
    by_hand = [[abs(float(w[i, j])) * norms[j] for j in range(6)] for i in range(4)]
    torch.testing.assert_close(pruner.metric.score("0.weight", layer.weight), torch.tensor(by_hand), rtol=1e-5,
                               atol=0, check_dtype=False)
    pruner.prune_to(0.5)
    kept = [sorted(range(6), key=lambda j, row=row: -row[j])[:3] for row in by_hand]
    expected = [[j in kept[i] for j in range(6)] for i in range(4)]
    assert (layer.weight != 0).tolist() == expected  # 3 of 6 in every row
    everywhere = sorted((v, i, j) for i, row in enumerate(by_hand) for j, v in enumerate(row))[12:]
    assert expected != [[(i, j) in {(a, b) for _, a, b in everywhere} for j in range(6)] for i in range(4)]


def _inputs(n: int, columns: int, seed: int) -> torch.Tensor:
    """Correlated inputs with unequal scales: what makes reconstruction worth more than |w|."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / columns ** 0.5 + torch.eye(columns)
    return (torch.randn(n, columns, generator=g) @ mix) * torch.linspace(0.2, 3.0, columns)


def test_one_pruned_weight_gets_optimal_brain_surgeons_update() -> None:
    """Pruning one weight of a row: the weight with the lowest w_j^2 / [(H_j)^-1]_00 goes (H_j: the damped H over
    columns j and later, as the columns before are already fixed), and the later columns move by
    -w_j / [(H_j)^-1]_00 * (H_j)^-1[:, 0]; the columns before stay as they were."""
    x = _inputs(200, 12, 1).double()
    h = 2 * x.T @ x / x.shape[0]
    damped = h + DAMP * torch.diag(h).mean() * torch.eye(12, dtype=h.dtype)
    w = torch.randn(1, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    inverses = [torch.linalg.inv(damped[j:, j:]) for j in range(12)]
    j = min(range(12), key=lambda k: float(w[0, k]) ** 2 / float(inverses[k][0, 0]))
    expected = w.clone()
    expected[0, j:] -= float(w[0, j]) / float(inverses[j][0, 0]) * inverses[j][:, 0]
    out = reconstruct(w, h.float(), [1], block=12)
    assert out[0, j] == 0 and int((out == 0).sum()) == 1
    assert out.double() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude(pattern: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 16, bias=False)
    x = _inputs(512, 64, 3)
    model = nn.Sequential(layer)
    batches = [x[:256], x[256:]]
    h = hessian(layer, batches, model)
    assert h == pytest.approx(2 * x.T @ x / 512, rel=1e-4, abs=1e-4)  # every row of every batch, once
    dense = layer.weight.detach().clone()
    nm = (2, 4) if pattern == "2:4" else None
    SparseGPT(model, batches, model, nm).prune_to(0.5)
    ours = layer.weight.detach()
    if nm:
        assert is_exactly_nm(ours != 0, 2, 4)
        magnitude = dense * keep_mask(dense.abs(), 2, 4)
    else:
        assert int((ours == 0).sum()) == prune_count(1024, 0.5)
        magnitude = dense * exact_count_mask([dense.abs()], prune_count(1024, 0.5))[0]
    error = float((x @ (dense - ours).T).square().sum())
    error_magnitude = float((x @ (dense - magnitude).T).square().sum())
    error_mask_only = float((x @ (dense - dense * (ours != 0)).T).square().sum())  # its mask, no update
    assert error < 0.7 * error_magnitude, (error, error_magnitude)
    assert error < 0.9 * error_mask_only, (error, error_mask_only)


def test_lazy_block_updates_give_the_same_weights_as_one_block() -> None:
    """Columns are updated a block at a time and the later blocks once per block (the paper's lazy batching):
    with N:M, whose choices do not depend on the block, blocks of 16 give what one block of 64 gives."""
    x = _inputs(300, 64, 4)
    h = 2 * x.T @ x / 300
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(reconstruct(w, h, nm=(2, 4), block=16), reconstruct(w, h, nm=(2, 4), block=64),
                               rtol=1e-4, atol=1e-5)


def test_sparsegpt_prunes_exactly_the_overall_count_over_blocks_and_layers() -> None:
    """Column blocks of 128 as the units of one uniform share: 300 columns make blocks of 128, 128 and 44, and
    the total over both layers is round(s * N) exactly; a convolution reads its unfolded inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 300), nn.Linear(300, 5))
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for sparsity in (0.37, 0.3333):  # per-block rounding alone would prune one weight too few at 33.33 %
        model.load_state_dict(weights)
        sparsegpt = SparseGPT(model, batches, model)
        sparsegpt.prune_to(sparsity)
        total = sum(p.numel() for _, p in sparsegpt.params)
        assert total == 4 * 27 + 144 * 300 + 300 * 5
        assert sum(int((p == 0).sum()) for _, p in sparsegpt.params) == prune_count(total, sparsity)
        assert sparsegpt.sparsity() == prune_count(total, sparsity) / total
