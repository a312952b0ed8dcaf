"""The released AdamWSPAM form against an independent implementation: pytorch-optimizer's SPAM.

pytorch-optimizer ports the authors' released optimizer; it is a test-only requirement. Its
post-reset warm-up reads the cosine one step later than the released code, so the two are
compared with warm-up 0, and the warm-up factor is tested on its own against the released
closed form 1 - 0.99 (1 + cos(pi k / (N + 1))) / 2.
"""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_optimizer import SPAM

from lib.optim.adamwspam import AdamWSPAM, released_warmup_factor

HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.1, "eps": 1e-6}
THETA, INTERVAL, ACCU, STEPS = 5.0, 7, 3, 30


def gradients(seed: int = 1) -> list[torch.Tensor]:
    """Float64 gradients with a spike every 4th step (100x on one entry), and one never-seen-before entry."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(1, STEPS + 1):
        g = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        if t % 4 == 0:
            g[0, 0] *= 100.0
        if t < 12:
            g[3, 4] = 0.0  # v stays 0 there until step 12: the released code clips a first gradient to 0
        grads.append(g)
    return grads


def test_released_form_equals_pytorch_optimizer_spam_step_by_step():
    torch.manual_seed(0)
    start = torch.randn(4, 5, dtype=torch.float64)
    ours_p, oracle_p = start.clone().requires_grad_(), start.clone().requires_grad_()
    ours = AdamWSPAM([ours_p], theta=THETA, interval=INTERVAL, warmup=0, accu=ACCU, form="released", **HYPER)
    oracle = SPAM([oracle_p], warmup_epoch=0, threshold=int(THETA), grad_accu_steps=ACCU,
                  update_proj_gap=INTERVAL, density=1.0, **HYPER)
    clipped = 0
    for t, g in enumerate(gradients(), start=1):
        v_prev = ours.state[ours_p]["exp_avg_sq"].clone() if ours.state else torch.zeros_like(g)
        if t % INTERVAL == 0:
            v_prev.zero_()
        if t >= ACCU and t % INTERVAL >= ACCU:
            clipped += int((g * g > THETA * v_prev).sum())
        ours_p.grad, oracle_p.grad = g.clone(), g.clone()
        ours.step()
        oracle.step()
        assert torch.allclose(ours_p, oracle_p, rtol=0, atol=1e-14), f"step {t}: {(ours_p - oracle_p).abs().max()}"
    assert clipped > 0 and ours.last_reset == 28  # spikes were clipped and the moments reset four times


@pytest.mark.parametrize("n", [1, 4, 150])
def test_released_warmup_factor_is_the_closed_form(n):
    for k in range(n + 3):
        expected = 1.0 - 0.99 * (1.0 + math.cos(math.pi * k / (n + 1))) / 2.0 if k < n else 1.0
        assert released_warmup_factor(k, n) == pytest.approx(expected, rel=1e-15)
    assert released_warmup_factor(0, n) == pytest.approx(0.01 + 0.99 * (1 - math.cos(0)) / 2)


def test_the_warmup_scales_the_step_after_a_reset():
    """With warm-up N the k-th step from a reset moves the weights by factor(k) times the un-warmed step."""
    n = 4
    runs = {}
    for warmup in (0, n):
        p = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
        opt = AdamWSPAM([p], theta=THETA, interval=INTERVAL, warmup=warmup, accu=ACCU, form="released",
                        **{**HYPER, "weight_decay": 0.0})
        moves = []
        for g in gradients()[:INTERVAL + n]:
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            moves.append(p.detach() - before)
        runs[warmup] = moves
    for k in range(n):  # steps INTERVAL .. INTERVAL + n - 1 are k = 0 .. n - 1 after the reset at step 7
        step = INTERVAL - 1 + k
        factor = released_warmup_factor(k, n)
        if k == 0:  # up to the reset both runs are the same, so the reset step's move differs by the factor
            assert torch.allclose(runs[n][step], factor * runs[0][step], rtol=1e-12, atol=0)
        assert factor < 1.0
    assert torch.equal(runs[n][INTERVAL - 2], runs[0][INTERVAL - 2])  # before the first reset: no warm-up
