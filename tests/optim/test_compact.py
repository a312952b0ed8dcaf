"""lib/optim/compact.py: moments for the kept weights only (issue 29, P4s).

The compact step must be the dense step to the bit for every path a run can take (AdamWPrune's fused C
kernel on both bases, its eager path over torch's AdamW, plain torch AdamW fused and foreach, the GPU's
gathered form); the layout's offsets must count what they claim; and the state must go back to dense
exactly, or be refused in one line when its mask does not fit it.
"""

from __future__ import annotations

import pytest
import torch

from lib.core.errors import HarnessError
from lib.optim import bitmask, compact, kernels
from lib.optim.adamwprune import AdamWPrune
from lib.optim.adamwspam import AdamWSPAM
from lib.optim.kernels import torch_kernels

needs_kernels = pytest.mark.skipif(bool(kernels.why_unavailable("cpu")), reason="no C kernels here")

PATHS = {  # name -> (optimizer kind, AdamWPrune fused?, torch's fused?)
    "adamwprune-fused": ("adamw", True, True), "adamwprune-spam-fused": ("adamwspam", True, True),
    "adamwprune-eager": ("adamw", False, True), "adamw-fused": ("plain", False, True),
    "adamw-foreach": ("plain", False, False),
}


def _train(path: str, use_compact: bool, steps: int = 12) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    kind, fused, torch_fused = PATHS[path]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 96), torch.nn.Linear(96, 8))
    if kind == "adamwspam":
        inner: torch.optim.Optimizer = AdamWSPAM(model.parameters(), lr=1e-2, weight_decay=0.1, interval=7,
                                                 warmup=3, accu=2, theta=5.0)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=torch_fused,
                                  foreach=None if torch_fused else True)
    opt = inner if kind == "plain" else AdamWPrune(inner, kind, fused=fused)
    state = compact.CompactState(opt) if use_compact else None
    x, y = torch.randn(32, 200), torch.randn(32, 8)
    masks: dict[torch.Tensor, torch.Tensor] = {}
    for i in range(steps):
        (((model(x) - y) ** 2).mean() * (100.0 if i % 5 == 4 else 1.0)).backward()  # spikes for SPAM to clip
        for param, packed in masks.items():
            bitmask.apply_(param.grad, packed)
        opt.step()
        opt.zero_grad()
        if i == 3:
            keep = {model[0].weight: torch.rand(96, 200) < 0.1, model[1].weight: torch.rand(8, 96) > 0.3}
            masks = {p: bitmask.pack(k) for p, k in keep.items()}
            for param, packed in masks.items():
                moments = [v for v in opt.state[param].values() if getattr(v, "shape", None) == param.shape]
                for t in [param.data, *moments]:
                    bitmask.apply_(t, packed)
            if isinstance(opt, AdamWPrune):
                opt.masks.update(masks)
            if state is not None:
                assert state.compact_(masks) == {}  # every masked weight compacted: no path left untested
    return model, opt


@pytest.mark.parametrize("path", list(PATHS))
def test_the_compact_step_is_the_dense_step_to_the_bit(path: str) -> None:
    if PATHS[path][1] and kernels.why_unavailable("cpu"):
        pytest.skip("no C kernels here")
    dense_model, dense = _train(path, False)
    model, opt = _train(path, True)
    for a, b in zip(dense_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    first = model[0].weight
    assert opt.state[first]["exp_avg"].numel() < first.numel() // 5  # compact: about a tenth, padded
    compact.compact_of(opt).expand_()
    for a, b in zip(dense_model.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(dense.state[a][key], opt.state[b][key])  # the moments too, once expanded


def test_the_layout_counts_the_kept_entries_before_each_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact, "CHUNK", 128)  # several chunks at a small size: every segment boundary is met
    n = 8 * 700 + 5  # an odd size: the last plane is short
    keep = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.3
    where = compact.layout(bitmask.pack(keep), n)
    planes, m = 8, bitmask.packed_size(n)
    chunks = -(-m // 128)
    flat_index = torch.arange(n)
    for j in range(planes):
        for c in range(chunks):
            first = j * m + c * 128  # the first entry of plane j's part of chunk c
            assert int(where.offsets[j * chunks + c]) == int(keep[flat_index < first].sum())
    assert where.kept == int(keep.sum())


def _pruned(n: int, seed: int, kept: float) -> tuple[list[torch.Tensor], torch.Tensor, compact.Layout]:
    """Weight, gradient and moments of ``n`` entries with a random ``kept`` fraction (the rest zero), its mask."""
    gen = torch.Generator().manual_seed(seed)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-2
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-5
    keep = torch.rand(n, generator=gen) < kept
    p[~keep] = m[~keep] = v[~keep] = 0
    return [p, g, m, v], keep, compact.layout(bitmask.pack(keep), n)


@needs_kernels
def test_the_c_kernel_walks_every_segment_and_the_short_last_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact, "CHUNK", 128)
    (p, g, m, v), keep, where = _pruned(8 * 700 + 5, 4, 0.3)
    packed = where.packed
    args = {"decay": 0.999, "beta1": 0.9, "beta2": 0.999, "step_size": 1e-3, "bc2_sqrt": 0.1, "eps": 1e-8}
    dense = [t.clone() for t in (p, g, m, v)]
    kernels.masked_adamw_(*dense, packed, **args)
    small = [compact._padded(t[keep], where.padded()) for t in (m, v)]
    mine = p.clone()
    assert kernels.compact_adamw_(mine, g, *small, packed, where.offsets, where.kept, compact.CHUNK, **args)
    assert torch.equal(mine, dense[0])
    assert torch.equal(small[0][: where.kept], dense[2][keep]) and torch.equal(small[1][: where.kept], dense[3][keep])


def test_the_gpu_form_gathers_then_runs_the_dense_kernel_to_the_bit() -> None:
    """The GPU's compact step (the dense Triton kernel over gathered entries), run here with the eager kernel."""
    (p, g, m, v), keep, where = _pruned(8 * 512, 5, 0.2)
    packed = where.packed
    scalars = [torch.tensor(x) for x in (0.999, 0.9, 0.999, 1e-3, 0.1, 1e-8)]
    dense = [t.clone() for t in (p, g, m, v)]
    torch_kernels.masked_adamw(*dense, packed, *scalars)
    small = [compact._padded(t[keep], where.padded()) for t in (m, v)]
    mine = p.clone()
    kernels._gathered("adamw", mine, g, *small, packed, where.kept, scalars, kernel=torch_kernels.masked_adamw)
    assert torch.equal(mine, dense[0]) and torch.equal(small[0][: where.kept], dense[2][keep])


def test_expanding_gives_back_the_dense_state_exactly() -> None:
    model = torch.nn.Linear(64, 32, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    keep = torch.rand(32, 64) < 0.25
    packed = bitmask.pack(keep)
    for t in (model.weight.data, opt.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg_sq"]):
        bitmask.apply_(t, packed)
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    state = compact.CompactState(opt)
    state.compact_({model.weight: packed})
    assert opt.state[model.weight]["exp_avg"].shape == (compact.PAD * -(-int(keep.sum()) // compact.PAD),)
    assert state.buffer_bytes() > 0 and state.settled
    state.expand_()
    assert not state.settled
    for key, value in before.items():
        assert torch.equal(opt.state[model.weight][key], value)


def _compacted_linear() -> tuple[torch.nn.Linear, torch.optim.Optimizer, torch.Tensor]:
    model = torch.nn.Linear(64, 32, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    packed = bitmask.pack(torch.rand(32, 64) < 0.25)
    compact.CompactState(opt).compact_({model.weight: packed})
    return model, opt, packed


def test_a_resume_without_compact_state_expands_it_and_says_so_once() -> None:
    model, opt, packed = _compacted_linear()
    note = compact.restore_(opt, {model.weight: packed}, {model.weight: "fc.weight"}, wanted=False)
    assert note.startswith("resume: the checkpoint holds compact optimizer state for 1 weights")
    assert opt.state[model.weight]["exp_avg"].shape == model.weight.shape
    assert compact.restore_(opt, {model.weight: packed}, {model.weight: "fc.weight"}, wanted=False) == ""


def test_compact_state_whose_mask_keeps_another_count_is_refused_in_one_line() -> None:
    model, opt, packed = _compacted_linear()
    other = bitmask.pack(torch.rand(32, 64) < 0.6)
    with pytest.raises(HarnessError, match=r"^checkpoint: compact optimizer state of 'fc.weight' holds \d+ entries "
                                           r"but its mask keeps \d+") as exc:
        compact.restore_(opt, {model.weight: other}, {model.weight: "fc.weight"}, wanted=True)
    assert "\n" not in str(exc.value)
    with pytest.raises(HarnessError, match="no pruning mask for it"):
        compact.restore_(opt, {}, {model.weight: "fc.weight"}, wanted=True)
    odd = torch.nn.Linear(5, 3, bias=False)  # 15 entries: the last plane is short, its padding bit must be 0
    odd_opt = torch.optim.AdamW(odd.parameters())
    odd_opt.state[odd.weight] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)}
    damaged = bitmask.pack(torch.ones(15, dtype=torch.bool))
    damaged[-1] |= 0x80  # entry 15 of a 15-entry tensor
    with pytest.raises(HarnessError, match=r"^checkpoint: the pruning mask of 'odd' is damaged \(the mask keeps "
                                           r"entries past its tensor's end"):
        compact.restore_(odd_opt, {odd.weight: damaged}, {odd.weight: "odd"}, wanted=True)


def test_what_has_no_compact_step_stays_dense_and_says_why() -> None:
    model = torch.nn.Linear(64, 32, bias=False)
    spam = AdamWPrune(AdamWSPAM(model.parameters(), lr=1e-3), "adamwspam", fused=False)
    model(torch.randn(4, 64)).sum().backward()
    spam.step()
    packed = bitmask.pack(torch.rand(32, 64) < 0.25)
    left = compact.CompactState(spam).compact_({model.weight: packed})
    assert left == {model.weight: "AdamWSPAM has no compact step without the fused masked step"}
    assert spam.state[model.weight]["exp_avg"].shape == model.weight.shape
    odd = torch.nn.Linear(5, 3, bias=False)
    opt = torch.optim.AdamW(odd.parameters())
    odd(torch.randn(2, 5)).sum().backward()
    opt.step()
    assert compact.CompactState(opt).why_not(odd.weight) == "its 15 entries are not a multiple of 16"


def test_a_mask_update_on_compact_state_expands_it_first() -> None:
    """A schedule re-resolved later (a time budget) can update settled masks again: the update must see dense
    state, and the trainer compacts again once the masks settle anew."""
    from lib.core.spec import PruneSettings
    from lib.pruning.magnitude import MagnitudePruner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    opt = torch.optim.AdamW(model.parameters())
    state = compact.CompactState(opt)
    pruner = MagnitudePruner(model, opt, PruneSettings(method="magnitude", target=0.5, start=0, end=1, frequency=1))
    pruner.set_total_steps(10)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    assert pruner.after_step(1) and pruner.masks_settled()
    assert state.compact_(pruner.packed_masks()) == {}
    pruner.applied = 0.25  # as if the schedule had moved its end past this step
    assert pruner.after_step(2)
    assert not state.settled and not state.layouts
    for param in (model[0].weight, model[1].weight):
        assert opt.state[param]["exp_avg"].shape == param.shape
