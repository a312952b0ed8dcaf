"""The fused masked step (lib/kernels, lib/optim/masked_step.py): same numbers as the eager path, exact zeros."""

from __future__ import annotations

import math

import pytest
import torch

from lib import hardware
from lib.optim import bitmask, kernels
from lib.optim.adamwprune import AdamWPrune
from lib.optim.adamwspam import AdamWSPAM
from lib.optim.kernels import native, torch_kernels

needs_kernels = pytest.mark.skipif(bool(native.why_unavailable()), reason=native.why_unavailable() or "ok")


def _tensors(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    p, g, m = (torch.randn(n, generator=gen) * s for s in (0.02, 1e-2, 1e-3))
    v = torch.rand(n, generator=gen) * 1e-5
    keep = torch.rand(n, generator=gen) > 0.4
    return p, g, m, v, keep


ADAMW = {"decay": 1 - 1e-3 * 0.1, "beta1": 0.9, "beta2": 0.999, "step_size": 1e-3 / (1 - 0.9**7),
         "bc2_sqrt": math.sqrt(1 - 0.999**7), "eps": 1e-8}
SPAM = {"theta": 50.0, "beta1": 0.9, "beta2": 0.999, "step": -1e-3 * 0.3, "eps": 1e-6, "decay": 1 - 1e-4}


@needs_kernels
@pytest.mark.parametrize("n", [8 * 3000, 8 * 3000 + 5, 1, 150])
@pytest.mark.parametrize("name", ["adamw", "spam"])
def test_c_kernel_matches_the_torch_reference(name: str, n: int) -> None:
    """Odd sizes too (the last bit-plane is short): the reference runs on a padded copy."""
    p, g, m, v, keep = _tensors(n)
    g[~keep] = float("nan")  # a pruned entry's gradient never leaks, even NaN
    pad = -n % 8
    ref = [torch.cat([t, t.new_zeros(pad)]) for t in (p, g, m, v)]
    packed = bitmask.pack(torch.cat([keep, keep.new_zeros(pad)]))
    mine = [t.clone() for t in (p, g, m, v)]
    if name == "adamw":
        torch_kernels.masked_adamw(*ref, packed, *(torch.tensor(x) for x in ADAMW.values()))
        native.masked_adamw_(*mine, bitmask.pack(keep), **ADAMW)
    else:
        torch_kernels.masked_spam(*ref, packed, torch.tensor(True), *(torch.tensor(x) for x in SPAM.values()))
        native.masked_spam_(*mine, bitmask.pack(keep), clip=True, **SPAM)
    for got, want in zip((mine[0], mine[2], mine[3]), (ref[0], ref[2], ref[3]), strict=True):
        torch.testing.assert_close(got, want[:n], rtol=1e-5, atol=1e-8)  # FMA and order rounding
        assert (got[~keep] == 0).all() and not got[~keep].signbit().any()  # +0.0 exactly


def test_compiled_torch_kernel_matches_eager() -> None:
    """The GPU path's code (torch.compile of torch_kernels) run on the CPU: same numbers as eager."""
    if hardware.detect().compile_works is False:
        pytest.skip("torch.compile cannot run here")
    p, g, m, v, keep = _tensors(8 * 500, seed=3)
    packed = bitmask.pack(keep)
    eager = [t.clone() for t in (p, g, m, v)]
    compiled = [t.clone() for t in (p, g, m, v)]
    scalars = [torch.tensor(x) for x in ADAMW.values()]
    torch_kernels.masked_adamw(*eager, packed, *scalars)
    torch_kernels.compiled("adamw")(*compiled, packed, *scalars)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)


def _train(fused: bool, base: str, steps: int = 24, clip_theta: float = 5.0) -> tuple[torch.nn.Module, AdamWPrune]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5))
    if base == "adamw":
        inner: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        inner = AdamWSPAM(model.parameters(), lr=1e-2, weight_decay=0.1, interval=7, warmup=3, accu=2,
                          theta=clip_theta)
    opt = AdamWPrune(inner, base, fused=fused)
    x, y = torch.randn(32, 16), torch.randn(32, 5)
    for i in range(steps):
        loss = ((model(x) - y) ** 2).mean() * (100.0 if i % 5 == 4 else 1.0)  # spikes for SPAM to clip
        loss.backward()
        if i == 3:
            opt.set_masks({model[0].weight: torch.rand(24, 16) > 0.5, model[2].weight: torch.rand(5, 24) > 0.3})
        opt.mask_gradients()
        opt.step()
        opt.zero_grad()
    return model, opt


@needs_kernels
@pytest.mark.parametrize("base", ["adamw", "adamwspam"])
def test_fused_adamwprune_follows_the_eager_path(base: str) -> None:
    eager_model, eager = _train(False, base)
    fused_model, fused = _train(True, base)
    for a, b in zip(eager_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for param, packed in fused.masks.items():
        pruned = ~bitmask.unpack(packed, param.shape)
        assert pruned.any()
        state = fused.state[param]
        for t in (param, state["exp_avg"], state["exp_avg_sq"]):
            assert (t[pruned] == 0).all()
        assert param.grad is None  # zero_grad reached the gradients the step set aside


@needs_kernels
def test_fused_step_skips_the_gradient_pass_unless_gradients_are_read_first() -> None:
    model = torch.nn.Linear(8, 8, bias=False)
    opt = AdamWPrune(torch.optim.AdamW(model.parameters()), fused=True)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.set_masks({model.weight: torch.eye(8, dtype=torch.bool)})
    model(torch.randn(4, 8)).sum().backward()
    before = model.weight.grad.clone()
    opt.mask_gradients()
    assert torch.equal(model.weight.grad, before)  # the fused step masks inside the update
    opt.grads_read_before_step = True  # gradient clipping must not count pruned weights
    opt.mask_gradients()
    assert (model.weight.grad[~torch.eye(8, dtype=torch.bool)] == 0).all()


def test_fused_without_masks_is_the_base_step_bit_for_bit() -> None:
    torch.manual_seed(1)
    a, b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2)
    pruned = AdamWPrune(torch.optim.AdamW(b.parameters(), lr=1e-2), fused=True)
    for _ in range(5):
        x = torch.randn(3, 6)
        for model, opt in ((a, plain), (b, pruned)):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_plan_falls_back_loudly_when_fused_is_asked_for_but_cannot_run(capsys: pytest.CaptureFixture) -> None:
    devices = hardware.Devices("cpu", cpu_cores=2, cpu_kernels="no C compiler (cc, gcc or clang) on the PATH")
    fused, why = hardware._fused_choice("on", False, devices)
    assert not fused and "FUSED_STEP_ON" in why and "no C compiler" in why and "eager" in why
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: CONFIG_FUSED_STEP_ON") and "no C compiler" in err[0]
    assert hardware._fused_choice("auto", False, devices) == (False, "fused masked step off (auto: no C compiler "
                                                                     "(cc, gcc or clang) on the PATH)")
    assert hardware._fused_choice("auto", False, hardware.Devices("cpu"))[0]
    assert not hardware._fused_choice("off", False, hardware.Devices("cpu"))[0]


def test_no_compiler_is_one_reason_and_the_masked_functions_decline(monkeypatch: pytest.MonkeyPatch) -> None:
    native._load.cache_clear()
    monkeypatch.setattr(native, "compiler", lambda: None)
    try:
        assert native.why_unavailable() == "no C compiler (cc, gcc or clang) on the PATH"
        p, g, m, v, keep = _tensors(64)
        assert not kernels.masked_adamw_(p, g, m, v, bitmask.pack(keep), **ADAMW)
        assert kernels.mask_update_(p, 0.01, bitmask.pack(keep), [m, v]) is None
    finally:
        native._load.cache_clear()


def test_sample_size_comes_from_the_tolerance_not_the_model() -> None:
    from lib.pruning.threshold import sample_size

    assert sample_size(0.5) == pytest.approx(2_592_100, abs=1)  # 0.25 * (3.22 * 100 / 0.1)^2
    assert sample_size(0.5, 0.2) == pytest.approx(sample_size(0.5) / 4, abs=1)
    assert sample_size(0.9) < sample_size(0.5)
    with pytest.raises(ValueError, match="tolerance"):
        sample_size(0.5, 0.0)


@needs_kernels
@pytest.mark.parametrize("method", ["magnitude", "state"])
def test_one_pass_mask_update_equals_the_two_pass_update(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same sampled cut, same masks, same zeros in the weights and moments; the score made once per tensor."""
    from lib.core.spec import PruneSettings
    from lib.pruning import build_pruner
    from lib.pruning.base import Pruner

    def setup() -> tuple[torch.nn.Module, AdamWPrune, object]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(64, 48, bias=False) for _ in range(3)))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = AdamWPrune(torch.optim.AdamW(model.parameters()))
        opt.step()
        settings = PruneSettings(method, target=0.5, threshold="sampled", sample_tolerance=5.0)  # 1037 of 9216 scores
        return model, opt, build_pruner(model, opt, settings)

    model_a, opt_a, one_pass = setup()
    model_b, opt_b, two_pass = setup()
    calls: list[str] = []
    importance = type(one_pass).importance
    monkeypatch.setattr(type(one_pass), "importance", lambda self, n, p: calls.append(n) or importance(self, n, p))
    one_pass.prune_to(0.5)
    assert len(calls) == (0 if method == "magnitude" else 3)  # |w| never materialised; bitter7 once per tensor
    monkeypatch.setattr(Pruner, "one_pass_masks", lambda self, sparsity: None)
    two_pass.prune_to(0.5)
    for (name, a), b in zip(one_pass.params, model_b.parameters(), strict=True):
        assert torch.equal(one_pass.mask(name), two_pass.mask(name))
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key])
    assert 0.45 < one_pass.sparsity() < 0.55


@needs_kernels
def test_block_gather_kernel_draws_the_same_sample_as_the_torch_path() -> None:
    from lib.pruning.threshold import LazyScores, sample_scores

    gen = torch.Generator().manual_seed(4)
    scores = [torch.rand(64 * 300, generator=gen), torch.rand(128, 64, generator=gen), torch.rand(64, generator=gen)]
    lazy = LazyScores(lambda i: scores[i], [s.numel() for s in scores],
                      gather=lambda i, idx: scores[i].reshape(-1)[idx])
    for seed in range(3):
        fast, slow = sample_scores(scores, 5_000, seed), sample_scores(lazy, 5_000, seed)
        assert torch.equal(fast, slow) and 4_000 < fast.numel() < 6_000


def test_sample_cut_with_a_mass_of_pruned_scores() -> None:
    """Zero weights rank -inf; the cut is found without partitioning that mass, and equals the plain selection."""
    from lib.pruning.threshold import _sample_cut

    gen = torch.Generator().manual_seed(5)
    sample = torch.rand(10_000, generator=gen)
    sample[torch.randperm(10_000, generator=gen)[:6_000]] = float("-inf")
    assert _sample_cut(sample.clone(), 0.5) == (float("-inf"), True)
    for quantile in (0.7, 0.95):
        j = min(10_000, max(1, round(quantile * 10_001)))
        want = float(sample.sort().values[j - 1])
        assert _sample_cut(sample.clone(), quantile) == (want, False)
