"""AdamWSPAM (spike clipping, resets, warm-up, knlp detector) and AdamWAdv (AMSGrad + clipping)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings
from lib.optim import build_optimizer, param_groups
from lib.optim.adamwadv import AdamWAdv
from lib.optim.adamwspam import AdamWSPAM, warmup_factor


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))


def loss_of(model: nn.Module, step: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    return scale * nn.functional.mse_loss(model(x), y)


def spam(param: torch.Tensor, **kw: object) -> AdamWSPAM:
    options = {
        "lr": 0.1,
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "weight_decay": 0.1,
        "theta": 4.0,
        "interval": 3,
        "warmup": 2,
        "clip": True,
        # The hand-worked sequences below follow the knlp form's reset / clipping / warm-up rules, each
        # keeping its z-score detector quiet (see each test); the released form: test_spam_oracle.py.
        "form": "knlp",
    } | kw
    return AdamWSPAM([param], **options)  # type: ignore[arg-type]


def feed(opt: torch.optim.Optimizer, param: torch.Tensor, grad: list[float]) -> None:
    param.grad = torch.tensor(grad, dtype=param.dtype)
    opt.step()


def test_hand_computed_sequence_clips_resets_and_warms_up() -> None:
    lr, wd, b1, b2, eps, theta = 0.1, 0.1, 0.9, 0.99, 1e-8, 4.0
    grads = [[1.0, -8.0], [3.0, 0.1], [0.5, -0.5], [5.0, 0.05], [-6.0, 0.06], [1.0, 1.0]]
    # The knlp z-score detector stays quiet: from step 3 on, every grad norm is at most the largest earlier one
    # (step 1's sqrt(65)), and a value no larger than the max of n <= 5 samples has a z-score of at most
    # (n - 1) / sqrt(n) < 2.
    # Interval 3, warm-up 2, worked out by hand: (reset before the update, warm-up factor, clipping allowed).
    # Step 3 and 6 reset (k=1: 0.5 * (1 - cos(pi/2)) = 0.5); step 4 is k=2 (factor 1, still no clipping).
    plan = [
        (False, 1.0, True),
        (False, 1.0, True),
        (True, 0.5, False),
        (False, 1.0, False),
        (False, 1.0, True),
        (True, 0.5, False),
    ]
    w = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    opt = spam(w)
    ew, m, v, s = [0.5, -0.3], [0.0, 0.0], [0.0, 0.0], 0
    clipped = []
    for t, (g, (reset, factor, clip)) in enumerate(zip(grads, plan, strict=True), start=1):
        if reset:
            m, v, s = [0.0, 0.0], [0.0, 0.0], 0
        s += 1
        for i in range(2):
            gi = g[i]
            if clip and v[i] > 0 and gi * gi > theta * v[i]:
                gi = math.copysign(math.sqrt(theta * v[i]), gi)
                clipped.append((t, i))
            ew[i] *= 1 - lr * wd  # decay is not scaled by the warm-up factor
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            ew[i] -= lr * factor * (m[i] / (1 - b1**s)) / (math.sqrt(v[i] / (1 - b2**s)) + eps)
        feed(opt, w, g)
        state = opt.state[w]
        assert state["step"] == s
        assert state["exp_avg"].tolist() == pytest.approx(m, rel=1e-12, abs=1e-15)
        assert state["exp_avg_sq"].tolist() == pytest.approx(v, rel=1e-12, abs=1e-15)
        assert w.tolist() == pytest.approx(ew, rel=1e-12, abs=1e-15)
    # Step 2's 3.0 and step 5's -6.0 are spikes; step 4's 5.0 is one too but falls in the warm-up window.
    assert clipped == [(2, 0), (5, 0)]
    assert (opt.spam_step, opt.last_reset, opt.soft_resets) == (6, 6, 0)


def test_reset_zeroes_moments_exactly_at_the_interval() -> None:
    w = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    opt = spam(w, clip=False)
    feed(opt, w, [1.0, -2.0])
    feed(opt, w, [0.3, 0.4])
    assert opt.state[w]["exp_avg"].abs().min() > 0 and opt.state[w]["step"] == 2
    feed(opt, w, [0.0, 0.0])  # step 3: reset, then a zero gradient keeps the moments at zero
    assert opt.soft_resets == 0  # a zero norm is below the mean: the knlp detector cannot fire
    assert opt.state[w]["exp_avg"].tolist() == [0.0, 0.0]
    assert opt.state[w]["exp_avg_sq"].tolist() == [0.0, 0.0]
    assert opt.state[w]["step"] == 1
    never = spam(torch.zeros(2, dtype=torch.float64, requires_grad=True), interval=0, clip=False)
    p = never.param_groups[0]["params"][0]
    for _ in range(10):
        feed(never, p, [1.0, 1.0])
    assert never.state[p]["step"] == 10 and never.last_reset == 0
    every = spam(torch.zeros(2, dtype=torch.float64, requires_grad=True), interval=1, warmup=0)
    p = every.param_groups[0]["params"][0]
    for _ in range(3):  # a reset on the very first step (no state yet) is fine
        feed(every, p, [1.0, 1.0])
    assert every.state[p]["step"] == 1 and every.last_reset == 3


def test_warmup_factors() -> None:
    assert [warmup_factor(k, 2) for k in (1, 2, 3)] == pytest.approx([0.5, 1.0, 1.0])
    assert warmup_factor(1, 4) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert warmup_factor(2, 4) == pytest.approx(0.5)
    assert warmup_factor(1, 0) == 1.0
    # In the optimizer: with zero decay the first post-reset step is exactly factor * the fresh-Adam step.
    for warmup, factor in ((4, warmup_factor(1, 4)), (0, 1.0)):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = spam(w, weight_decay=0.0, interval=2, warmup=warmup, clip=False)
        feed(opt, w, [1.0])
        before = w.item()
        feed(opt, w, [1.0])  # step 2 resets: m_hat = v_hat = 1, so the step is lr * factor / (1 + eps)
        assert before - w.item() == pytest.approx(0.1 * factor / (1 + 1e-8), rel=1e-12)


def test_knlp_soft_reset_fires_on_a_norm_spike_only() -> None:
    for form in ("knlp", "released"):  # released: no detector, the spike goes into the moments unscaled
        w = torch.zeros(4, requires_grad=True)
        opt = spam(w, form=form, theta=1e12, interval=0, warmup=0, weight_decay=0.0)
        for t in range(30):  # steady: norms alternate 2.0 / 2.2, z-scores stay near 1
            feed(opt, w, [1.0 + 0.1 * (t % 2)] * 4)
        assert opt.soft_resets == 0
        m0, v0 = opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone()
        feed(opt, w, [1000.0] * 4)
        g = torch.full((4,), 1000.0)
        soft = form == "knlp"
        m_prev, v_prev = (0.5 * m0, 0.9 * v0) if soft else (m0, v0)
        assert opt.soft_resets == int(soft)
        torch.testing.assert_close(opt.state[w]["exp_avg"], 0.9 * m_prev + 0.1 * g)
        torch.testing.assert_close(opt.state[w]["exp_avg_sq"], 0.99 * v_prev + 0.01 * g * g)
    # A spike on a perfectly constant history (std 0) is not scored.
    w = torch.zeros(2, requires_grad=True)
    opt = spam(w, form="knlp", theta=1e12, interval=0)
    for g in ([1.0, 1.0],) * 5 + ([1000.0, 1000.0],):
        feed(opt, w, g)
    assert opt.soft_resets == 0


def spam_settings(**kw: object) -> OptimSettings:
    base = {"lr": 1e-2, "weight_decay": 0.1, "beta2": 0.99, "eps": 1e-6} | kw
    return OptimSettings(name="adamwspam", **base)  # type: ignore[arg-type]


def test_spam_without_spam_is_torch_adamw() -> None:
    model = net()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, spam_settings(spam_theta=1e12, spam_interval=0, spam_warmup=0, spam_clip=True,
                                                   spam_form="knlp"))
    torch_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, foreach=False)
    for step in range(50):
        for m, o in ((model, opt), (ref, torch_opt)):
            o.zero_grad()
            loss_of(m, step).backward()
            o.step()
    assert opt.soft_resets == 0  # the knlp detector stayed quiet on this data (it would break the match)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_adamwadv_is_torch_amsgrad_after_clipping() -> None:
    model = net()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, OptimSettings(name="adamwadv", lr=1e-2, weight_decay=0.1))
    assert isinstance(opt, AdamWAdv) and opt.param_groups[0]["amsgrad"] is True
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append(1))
    torch_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, amsgrad=True, foreach=False)
    norms = []
    for step in range(20):
        opt.zero_grad()
        if step % 2:  # closures work too: the gradient they compute gets clipped
            opt.step(lambda s=step: loss_of(model, s, 100.0).backward())
        else:
            loss_of(model, step, 100.0).backward()
            opt.step()
        torch_opt.zero_grad()
        loss_of(ref, step, 100.0).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)))
        torch_opt.step()
    assert min(norms) > 1.0  # clipping was active every step
    assert len(calls) == 20  # the clip hook does not make torch run hooks twice
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        OptimSettings(name="adamwadv", lr=1e-2, weight_decay=0.1),
        spam_settings(spam_theta=5.0, spam_interval=7, spam_warmup=3),
        spam_settings(spam_form="knlp", spam_theta=5.0, spam_interval=7, spam_warmup=3),
    ],
    ids=["adamwadv", "adamwspam-released", "adamwspam-knlp"],
)
def test_masked_weights_stay_exactly_zero(settings: OptimSettings) -> None:
    model = net()
    weight = model[0].weight
    mask = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5).to(weight.dtype)
    with torch.no_grad():
        weight.mul_(mask)
    start = weight.detach().clone()
    opt = build_optimizer(model, settings)
    for step in range(50):
        opt.zero_grad()
        loss_of(model, step, 1000.0 if step in (20, 35) else 1.0).backward()  # spikes for the detector
        weight.grad.mul_(mask)
        opt.step()
        assert torch.equal(weight[mask == 0], torch.zeros_like(weight[mask == 0]))
    assert (weight[mask == 1] != start[mask == 1]).all()
    if settings.spam_form == "knlp":
        assert opt.soft_resets >= 1


@pytest.mark.parametrize("name", ["adamwadv", "adamwspam"])
def test_param_groups_and_state(name: str) -> None:
    model = net()
    opt = build_optimizer(model, OptimSettings(name=name, lr=1e-3, weight_decay=0.1))
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert decay == {"0.weight": 0.1, "3.weight": 0.1, "0.bias": 0.0, "2.weight": 0.0, "2.bias": 0.0, "3.bias": 0.0}
    loss_of(model, 0).backward()
    opt.step()
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(opt.state[model[0].weight])
    fresh = build_optimizer(model, OptimSettings(name=name, lr=1e-3, weight_decay=0.1))
    fresh.load_state_dict(opt.state_dict())
    torch.testing.assert_close(fresh.state[model[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    if name == "adamwspam":
        assert fresh.spam_step == 1
        with pytest.raises(ConfigError, match="adamwspam.*fused"):
            build_optimizer(model, OptimSettings(name=name, lr=1e-3, weight_decay=0.1), fused=True)
