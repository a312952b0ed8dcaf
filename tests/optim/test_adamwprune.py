"""AdamWPrune: bit-packed masks, the bitter scores, the optimizer and the state pruner."""

from __future__ import annotations

import importlib.util
import io
import math

import pytest
import torch
from torch import nn

from lenet5.model import LeNet5
from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings
from lib.hardware import memory
from lib.optim import bitmask, build_optimizer, masked_step
from lib.optim.adamwprune import AdamWPrune
from lib.optim.adamwspam import AdamWSPAM
from lib.optim.groups import param_groups
from lib.pruning import bitter, build_pruner
from lib.pruning.state import StatePruner
from tests.conftest import ROOT
from tests.conftest import small_conv_net as net


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# -- bit-packed masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 150, 1001, 4096, 8 * 4096 + 64])
def test_pack_round_trip_and_size(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = bitmask.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8) == bitmask.packed_size(n)
    assert torch.equal(bitmask.unpack(packed, (n,)), mask)


@pytest.mark.parametrize("shape", [(3, 5, 5), (64, 8), (256, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_apply_zeroes_exactly_the_pruned_entries(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(shape, generator=gen) > 0.3
    x = torch.randn(shape, generator=gen).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -1.0, float("-inf")], dtype=dtype)
    expected = torch.where(keep, x, torch.zeros((), dtype=dtype))
    bitmask.apply_(x, bitmask.pack(keep), chunk=64)  # small chunks: several chunks and a partial last one
    torch.testing.assert_close(x[keep], expected[keep], rtol=0, atol=0, equal_nan=True)  # kept: untouched
    pruned = x[~keep]
    assert bool((pruned == 0).all()) and not bool(pruned.signbit().any())  # +0.0 even for NaN/inf/negative


# -- bitter scores: hand computations -------------------------------------------------------------

W = torch.tensor([0.5, -2.0, 0.25, 0.0])
M = torch.tensor([0.04, -0.09, 0.0, 0.01])
V = torch.tensor([0.16, 0.81, 0.01, 0.16])  # sqrt(v) = 0.4, 0.9, 0.1, 0.4

HAND = {
    # |w*m| * |w| / sqrt(v): 0.02*0.5/0.4, 0.18*2/0.9, 0, 0
    "bitter0": [0.025, 0.4, 0.0, 0.0],
    "bitter1": [0.5, 2.0, 0.25, 0.0],
    "bitter2": [0.5, 2.0, 0.25, 0.0],
    # |w| * sqrt(|m| + 1e-8): 0.5*0.2, 2*0.3, 0.25*sqrt(1e-8), 0
    "bitter3": [0.1, 0.6, 2.5e-5, 0.0],
    "bitter4": [0.1, 0.6, 2.5e-5, 0.0],
    # sign(w)*m/sqrt(v) + 0.1|w|: 0.04/0.4+0.05, 0.09/0.9+0.2, 0+0.025, sign(0)=0 -> 0
    "bitter5": [0.15, 0.3, 0.025, 0.0],
    # bitter3 * sqrt(m^2/v): 0.1*0.1, 0.6*0.1, 2.5e-5*0, 0*0.025
    "bitter6": [0.01, 0.06, 0.0, 0.0],
    # |w| * v^0.25: 0.5*sqrt(0.4), 2*sqrt(0.9), 0.25*sqrt(0.1), 0
    "bitter7": [0.31622777, 1.8973666, 0.07905696, 0.0],
    # step 2, beta1 0.9: m_hat = m / 0.19; |w| * sqrt(|m_hat|)
    "bitter8": [0.22941573, 1.3764944, 0.0, 0.0],
}


@pytest.mark.parametrize("variant", sorted(HAND))
def test_bitter_formula_by_hand(variant: str) -> None:
    got = bitter.score_fn(variant)(W, M, V, 2, 0.9)
    assert got.shape == W.shape
    assert torch.allclose(got, torch.tensor(HAND[variant]), rtol=2e-6, atol=1e-12), got


def test_bitter8_knlp_form_is_fp16_fourth_root_of_v() -> None:
    got = bitter.score_fn("bitter8", "knlp")(W, M, V, 2, 0.9)
    # |w| * (|v| + 1e-5)^0.25, at fp16 precision (m and the step do not enter)
    assert torch.allclose(got, torch.tensor([0.3162327, 1.8973725, 0.0790767, 0.0]), rtol=1e-3)
    assert got.dtype == torch.float32 and torch.equal(got.half().float(), got)  # values are fp16 numbers


@pytest.mark.parametrize("form", ["paper", "knlp"])
def test_bitter9_equals_bitter8(form: str) -> None:
    gen = torch.Generator().manual_seed(1)
    for shape, scale in (((96, 40), 1e-3), ((6, 1, 5, 5), 1e-7)):
        w, m = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * scale
        v = torch.rand(shape, generator=gen) * scale**2
        for step in (1, 7):
            eager = bitter.score_fn("bitter8", form)(w, m, v, step, 0.9)
            assert torch.equal(bitter.score_fn("bitter9", form)(w, m, v, step, 0.9), eager)


def test_no_state_falls_back_to_magnitude_and_unknown_variant_lists_names() -> None:
    for variant in bitter.BITTER:
        assert torch.equal(bitter.importance(bitter.score_fn(variant), W, {}, 0.9), W.abs())
    with pytest.raises(ConfigError, match="bitter0.*bitter9"):
        bitter.score_fn("bitter10")


def test_bitter4_layer_targets() -> None:
    assert [round(bitter.layer_sparsity(0.5, i, 5), 6) for i in range(5)] == [0.35, 0.425, 0.5, 0.575, 0.65]
    assert bitter.layer_sparsity(0.9, 4, 5) == 0.95  # capped
    assert bitter.layer_sparsity(0.5, 0, 1) == 0.5  # one tensor: the target itself


# -- the optimizer ------------------------------------------------------------------------------





def batch(i: int, image: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(16, 1, image, image, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def settings(base: str = "adamw", **kw: object) -> OptimSettings:
    return OptimSettings("adamwprune", lr=1e-2, weight_decay=0.1, base=base, **kw)  # type: ignore[arg-type]


SPAM = {"spam_interval": 30, "spam_warmup": 10, "spam_theta": 50.0}


def twin_baseline(model: nn.Module, s: OptimSettings) -> torch.optim.Optimizer:
    if s.base == "adamwspam":
        from lib.optim import adamwspam

        return adamwspam.build(model, s)
    return torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps,
                             weight_decay=s.weight_decay, amsgrad=s.amsgrad, fused=True)


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True}, {"base": "adamwspam", **SPAM},
                                {"base": "adamwspam", "spam_form": "knlp", **SPAM}])
def test_pruning_off_is_bit_identical_to_the_base(kw: dict) -> None:
    s = settings(**kw)
    a, b = net(), net()
    opt_a, opt_b = build_optimizer(a, s), twin_baseline(b, s)
    assert isinstance(opt_a, AdamWPrune)
    assert isinstance(opt_a.base, AdamWSPAM if s.base == "adamwspam" else torch.optim.AdamW)
    if s.base == "adamw":
        assert opt_a.param_groups[0]["fused"] is True
    for i in range(100):
        for model, opt in ((a, opt_a), (b, opt_b)):
            x, y = batch(i)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert opt_a.state is opt_a.base.state and opt_a.param_groups is opt_a.base.param_groups


def train(model: nn.Module, opt: torch.optim.Optimizer, pruner: StatePruner, steps: range, image: int = 8,
          check=None) -> None:
    """The trainer's call order: backward, before_step, step, zero_grad, after_step."""
    for step in steps:
        x, y = batch(step, image)
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.before_step()
        if check:
            check()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.after_step(step)


def one_shot(target: float, at: int, variant: str = "bitter7", **kw: object) -> PruneSettings:
    return PruneSettings(method="state", target=target, start=at, end=at, frequency=1, variant=variant, **kw)


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True}, {"base": "adamwspam", **SPAM}])
def test_pruned_weights_grads_and_moments_stay_exactly_zero(kw: dict) -> None:
    model = net()
    opt = build_optimizer(model, settings(**kw))
    pruner = build_pruner(model, opt, one_shot(0.6, at=5))
    pruner.set_total_steps(70)
    train(model, opt, pruner, range(1, 6))
    assert abs(pruner.sparsity() - 0.6) < 1e-3

    def grads_zero() -> None:
        if opt.fused and masked_step.fusable(opt):  # the mask is inside the update; gradients are left as they are
            return
        for name, p in pruner.params:
            assert bool((p.grad[~pruner.mask(name)] == 0).all())

    train(model, opt, pruner, range(6, 66), check=grads_zero)
    for name, p in pruner.params:
        pruned = ~pruner.mask(name)
        tensors = [p] + [t for t in opt.state[p].values() if torch.is_tensor(t) and t.shape == p.shape]
        assert len(tensors) == (4 if kw.get("amsgrad") else 3)
        assert all(bool((t[pruned] == 0).all()) for t in tensors)
        assert bool((p[~pruned] != 0).any())  # the kept weights did train


def test_bitter7_reaches_target_on_lenet5() -> None:
    torch.manual_seed(0)
    model = LeNet5()
    opt = build_optimizer(model, settings())
    pruner = build_pruner(model, opt, PruneSettings(method="state", target=0.7, start=2, end=12, frequency=2,
                                                    variant="bitter7"))
    pruner.set_total_steps(15)
    train(model, opt, pruner, range(1, 16), image=32)
    assert abs(pruner.sparsity() - 0.7) <= 0.005
    assert opt.mask_bytes() == pruner.buffer_bytes() == sum(math.ceil(p.numel() / 8) for _, p in pruner.params)


def test_bitter4_prunes_each_layer_to_its_own_target() -> None:
    model = LeNet5()
    opt = build_optimizer(model, settings())
    pruner = build_pruner(model, opt, one_shot(0.5, at=2, variant="bitter4"))
    pruner.set_total_steps(3)
    train(model, opt, pruner, range(1, 3), image=32)
    count = len(pruner.params)
    for i, (_, p) in enumerate(pruner.params):
        expected = round(bitter.layer_sparsity(0.5, i, count) * p.numel())
        assert int((p == 0).sum()) == expected


def test_memory_masks_are_one_bit_per_weight_and_not_optimizer_state() -> None:
    model = LeNet5()
    opt = build_optimizer(model, settings())
    pruner = build_pruner(model, opt, one_shot(0.5, at=1))
    pruner.set_total_steps(2)
    train(model, opt, pruner, range(1, 2), image=32)
    for _, p in pruner.params:
        packed = opt.masks[p]
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(p.numel() / 8)
    sb = memory.state_bytes(model, opt, pruner.buffer_bytes())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert sb["optimizer_state"] == moments  # masks live beside the state, not in it: counted once
    ratio = (sb["weights"] + sb["optimizer_state"] + sb["pruning_buffers"]) / sb["weights"]
    assert ratio <= 3.04, ratio


def test_state_pruner_needs_adamwprune_and_a_known_base() -> None:
    model = net()
    adamw = build_optimizer(model, OptimSettings("adamw", lr=1e-3, weight_decay=0.0))
    with pytest.raises(ConfigError, match="CONFIG_PRUNING_STATE.*CONFIG_OPTIMIZER_ADAMWPRUNE"):
        build_pruner(model, adamw, one_shot(0.5, at=1))
    with pytest.raises(ConfigError, match="adamw, adamwspam"):
        build_optimizer(model, settings(base="lion"))


def test_checkpoint_round_trip_weights_only() -> None:
    model = net()
    opt = build_optimizer(model, settings())
    pruner = build_pruner(model, opt, one_shot(0.5, at=2))
    pruner.set_total_steps(3)
    train(model, opt, pruner, range(1, 3))
    buf = io.BytesIO()
    torch.save({"pruner": pruner.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    fresh = net(seed=1)  # dense weights: loading must re-apply the masks
    fresh_opt = build_optimizer(fresh, settings())
    restored = build_pruner(fresh, fresh_opt, one_shot(0.5, at=2))
    restored.load_state_dict(saved["pruner"])
    assert restored.step == 2 and restored.applied == 0.5
    for (name, p), (_, q) in zip(pruner.params, restored.params, strict=True):
        assert torch.equal(fresh_opt.masks[q], opt.masks[p]) and restored.masks[name] is fresh_opt.masks[q]
        assert bool((q[~restored.mask(name)] == 0).all())
    # One owner: the optimizer's state dict holds no second copy of the masks, and loading it after the
    # pruner (either order works) keeps the pruner's masks installed and applied to the loaded state.
    assert "masks" not in saved["optim"] and saved["pruner"]["masks"]
    fresh_opt.load_state_dict(saved["optim"])
    for (name, p), (_, q) in zip(pruner.params, restored.params, strict=True):
        assert torch.equal(fresh_opt.masks[q], opt.masks[p]) and restored.masks[name] is fresh_opt.masks[q]
        assert bool((fresh_opt.state[q]["exp_avg"][~restored.mask(name)] == 0).all())
    restored.masks = {}
    assert not fresh_opt.masks  # assigning the view empties the optimizer's store: there is no other


def test_bench_parts_run_tiny() -> None:
    spec = importlib.util.spec_from_file_location("bench_parts", ROOT / "scripts" / "bench_parts_adamwprune.py")
    assert spec and spec.loader
    parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parts)
    for fn in (parts.p1, parts.p2, parts.p2_spam, parts.p4_adamwprune):
        result = fn(20_000, repeats=2)
        assert set(result) == {"name", "value", "target", "detail"} and result["value"] > 0
    assert parts.p4_adamwprune(20_000)["value"] <= 3.04


def test_pruning_off_equals_the_registrys_adamw_bit_for_bit():
    """The matrix compares `adamw` with `adamwprune`: with pruning off they must be one code path."""
    from lib.core.spec import OptimSettings
    from lib.optim import build_optimizer

    models = [net(3), net(3)]
    opts = [build_optimizer(m, OptimSettings(name, 3e-3, 0.01)) for m, name in zip(models, ("adamw", "adamwprune"),
                                                                                     strict=True)]
    torch.manual_seed(0)
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(30)]
    for model, opt in zip(models, opts, strict=True):
        for x, y in batches:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
