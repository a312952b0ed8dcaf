"""AdamWPrune benchmark parts (P1, P2, P2s, P4), imported by scripts/bench_pruning.py.

Each function measures on the CPU, in this process, over weights shaped like
GPT-2 124M's Linear layers: per block c_attn 768x2304, attn c_proj 768x768,
mlp c_fc 768x3072 and mlp c_proj 3072x768, 12 blocks (84.9M), plus the tied
50304x768 token table as one more Linear (38.6M): 123.6M weights in 49
tensors, all prunable. ``n_params`` scales every dimension by
``sqrt(n_params / 123.6M)`` (rounded to multiples of 8) so tests run tiny;
``n_params=124_000_000`` is full size. Gradients are fixed random tensors
(no forward/backward): the step is what is measured. Timings are the median
of ``repeats`` runs after warm-up, the compared sides interleaved (A, B, A,
B, ...) so that drift and neighbours' load hit both alike. Results:
``{"name", "value", "target", "detail"}`` with raw milliseconds in detail.

- P1: AdamWPrune step with pruning off / torch AdamW ``fused=True`` step
  (target <= 1.05). Also torch's foreach form and the fused speed-up.
- P2: AdamWPrune between mask updates, its fused masked step (the mask inside
  the update, lib/optim/masked_step.py) with a 50% mask / the same dense fused
  AdamW step (target <= 1.15). Also the eager way (a separate masking pass over
  the gradients, then the base's step) and the floor of any separate pass (one
  bare read-modify-write of every gradient, ``separate_pass_floor``): about
  1.3 here, which is why the mask had to move inside the update. And the same
  step through torch.compile's CPU kernel (``inductor_over_dense``), the reason the
  CPU path is a hand-written C kernel. Zeros cannot
  cause denormals: a pruned entry is exactly +0.0 and stays so;
  ``subnormal_fraction`` counts the state's subnormals.
- P2s: the same on AdamWSPAM's released form with spike clipping on (what the
  gpt2-finewebedu-* defconfigs run) / dense fused AdamW (target <= 1.5).
- P4: (weights + optimizer state + pruning buffers) / weights in bytes for
  AdamWPrune with the state pruner at 50% (target <= 3.04; exact value
  3 + 1/32 plus the step counters).
- P4s: the same at 90% with compact state (lib/optim/compact.py: moments for
  the kept weights only, plus their segment offsets) (target <= 1.3), and
  P4s step: its compact fused step / the dense fused AdamW step (target <= 1.15).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lib.core import timing  # noqa: E402
from lib.core.spec import OptimSettings, PruneSettings  # noqa: E402
from lib.hardware import memory  # noqa: E402
from lib.optim import (
    kernels,  # noqa: E402
    masked_step,  # noqa: E402
)
from lib.optim.adamwprune import AdamWPrune  # noqa: E402
from lib.optim.adamwprune import build as build_adamwprune  # noqa: E402
from lib.optim.compact import CompactState  # noqa: E402
from lib.optim.groups import param_groups  # noqa: E402
from lib.optim.kernels import torch_kernels  # noqa: E402
from lib.pruning.state import StatePruner  # noqa: E402

BLOCK = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of each block's Linear layers
GPT2_SHAPES = BLOCK * 12 + [(768, 50304)]  # + the tied token table as a Linear
FULL = sum(i * o for i, o in GPT2_SHAPES)  # 123,568,128
SETTINGS = OptimSettings("adamwprune", lr=6e-4, weight_decay=0.1)


def gpt2_shapes(n_params: int) -> list[tuple[int, int]]:
    """(in, out) of the 49 Linear layers, every dimension scaled so the total is about ``n_params``."""
    scale = math.sqrt(n_params / FULL)
    return [(max(8, round(i * scale / 8) * 8), max(8, round(o * scale / 8) * 8)) for i, o in GPT2_SHAPES]


def make_model(n_params: int, seed: int = 0, device: str = "cpu") -> nn.Module:
    """The Linear stack with N(0, 0.02) weights and fixed random gradients (1e-3 scale), on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.utils.skip_init(nn.Linear, i, o, bias=False) for i, o in gpt2_shapes(n_params)]
    model = nn.Sequential(*layers)
    for p in model.parameters():
        p.requires_grad_(True)
        with torch.no_grad():
            p.normal_(0.0, 0.02, generator=gen)
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3)
    return model.to(device)  # drawn on the CPU first: the same numbers on every device


def fused_adamw(model: nn.Module, **impl: bool) -> torch.optim.Optimizer:
    """torch AdamW with the settings AdamWPrune uses, ``impl`` = fused=True or foreach=True."""
    return torch.optim.AdamW(param_groups(model, SETTINGS.weight_decay), lr=SETTINGS.lr,
                             betas=(SETTINGS.beta1, SETTINGS.beta2), eps=SETTINGS.eps,
                             weight_decay=SETTINGS.weight_decay, **impl)


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each side, the sides run in turn every repetition.

    The turn order rotates by one each repetition, so no side always follows
    the same neighbour (whose cache footprint or heat it would inherit).
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    _sync()
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start = time.perf_counter()
            sides[name]()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {**{f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()},
            "timing": timing.summary(times)}  # each side's spread and the load (lib/core/timing.py)


def _sync() -> None:
    """Wait for the GPU's queued kernels (scripts/gpu_check.py times these steps on CUDA); a no-op otherwise."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _result(name: str, value: float, target: float, detail: dict) -> dict:
    return {"name": name, "value": value, "target": target, "detail": detail}


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[int]:
    """Run with ``count`` intra-op threads (None: leave torch's setting), restored afterwards.

    On a shared machine one thread is the robust choice: each multi-threaded
    op waits for its slowest thread, so a core busy with another process
    stalls every op by up to a scheduler time slice (measured here: the same
    fused step 22 ms on one thread, 400 ms on two with the other core busy).
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _random_masks(model: nn.Module, keep: float, seed: int = 1) -> dict[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: (torch.rand(p.shape, generator=gen) < keep).to(p.device) for p in model.parameters()}


def _subnormal_fraction(opt: torch.optim.Optimizer) -> float:
    tiny = torch.finfo(torch.float32).tiny
    count = total = 0
    for state in opt.state.values():
        for t in (state["exp_avg"], state["exp_avg_sq"]):
            count += int(((t != 0) & (t.abs() < tiny)).sum())
            total += t.numel()
    return count / max(1, total)


def p1(n_params: int, *, repeats: int = 7, num_threads: int | None = None, device: str = "cpu") -> dict:
    """AdamWPrune (pruning off) step time / torch fused AdamW step time; target <= 1.05."""
    a, b = make_model(n_params, device=device), make_model(n_params, device=device)
    prune_opt = build_adamwprune(a, SETTINGS)  # fused base: the CPU has torch's fused AdamW
    fused, foreach = fused_adamw(b, fused=True), fused_adamw(b, foreach=True)  # foreach: own state, b's weights
    with threads(num_threads) as used:
        ms = interleaved({"adamwprune": prune_opt.step, "adamw_fused": fused.step, "adamw_foreach": foreach.step},
                         repeats)
    detail = {**ms, "n_params": sum(p.numel() for p in a.parameters()),
              "base_fused": bool(prune_opt.param_groups[0]["fused"]), "threads": used,
              "foreach_over_fused": ms["adamw_foreach_ms"] / ms["adamw_fused_ms"]}
    return _result("P1 AdamWPrune(off)/AdamW fused step", ms["adamwprune_ms"] / ms["adamw_fused_ms"], 1.05, detail)


def _masked(model: nn.Module, settings: OptimSettings, warm_steps: int = 1) -> AdamWPrune:
    """AdamWPrune with the fused masked step, its moments made, then a 50% mask installed."""
    opt = build_adamwprune(model, settings)
    assert isinstance(opt, AdamWPrune)
    for _ in range(warm_steps):
        opt.step()
    opt.set_masks(_random_masks(model, keep=0.5))
    opt.fused = masked_step.fusable(opt) and not kernels.why_unavailable(next(model.parameters()).device.type)
    return opt


def _eager(opt: AdamWPrune) -> Callable[[], None]:
    """The same step the eager way: a separate masking pass over the gradients, then the base's step."""
    def step() -> None:
        opt.fused = False
        opt.mask_gradients()
        opt.step()
        opt.fused = True
    return step


def p2(n_params: int, *, repeats: int = 7, num_threads: int | None = None, device: str = "cpu",
       inductor: bool = True) -> dict:
    """AdamWPrune's fused masked step with a 50% mask / dense fused AdamW step; target <= 1.15."""
    a, b = make_model(n_params, device=device), make_model(n_params, device=device)
    prune_opt, dense = _masked(a, SETTINGS), fused_adamw(b, fused=True)
    grads = {p: p.grad.clone() for p in a.parameters()}  # the eager side masks them; each round restores them

    def eager() -> None:
        for p, g in grads.items():
            p.grad.copy_(g)
        _eager(prune_opt)()

    def bare_pass() -> None:  # the floor of any separate masking pass: one read-modify-write of every grad
        for p in b.parameters():
            p.grad.mul_(1.0)

    with threads(num_threads) as used:
        ms = interleaved({"fused_masked_step": prune_opt.step, "adamw_fused_dense": dense.step,
                          "eager_mask_and_step": eager, "bare_grad_pass": bare_pass}, repeats)
        if inductor and device == "cpu":  # on a GPU the fused step above is this very kernel
            ms.update(_inductor_step_ms(a, prune_opt, repeats))
    pruned = sum(int((p == 0).sum()) for p in a.parameters()) / sum(p.numel() for p in a.parameters())
    detail = {**ms, "fused": prune_opt.fused, "pruned_fraction": pruned, "threads": used,
              "eager_over_dense": ms["eager_mask_and_step_ms"] / ms["adamw_fused_dense_ms"],
              "inductor_over_dense": ms.get("inductor_masked_step_ms", math.nan) / ms["adamw_fused_dense_ms"],
              "separate_pass_floor": 1 + ms["bare_grad_pass_ms"] / ms["adamw_fused_dense_ms"],
              "subnormal_fraction": _subnormal_fraction(dense)}
    return _result("P2 AdamWPrune fused masked step/AdamW fused",
                   ms["fused_masked_step_ms"] / ms["adamw_fused_dense_ms"], 1.15, detail)


def _inductor_step_ms(model: nn.Module, opt: AdamWPrune, repeats: int) -> dict[str, float]:
    """The same masked update through torch.compile's CPU kernel (lib/optim/kernels/torch_kernels.py, the GPU path),
    on copies of the tensors; why the CPU path is a C kernel instead. Empty where compile cannot run."""
    try:
        kernel = torch_kernels.compiled("adamw")
        scalars = [torch.tensor(x) for x in (1 - 6e-5, 0.9, 0.95, 1e-3, 0.03, 1e-8)]
        work = [(p.detach().clone().view(-1), p.grad.view(-1), opt.state[p]["exp_avg"].clone().view(-1),
                 opt.state[p]["exp_avg_sq"].clone().view(-1), opt.masks[p]) for p in model.parameters()]

        def step() -> None:
            for p, g, m, v, packed in work:
                kernel(p, g, m, v, packed, *scalars)

        step()  # compile (one graph for every size)
        return {"inductor_masked_step_ms": interleaved({"inductor": step}, repeats, warmup=1)["inductor_ms"]}
    except Exception as exc:  # noqa: BLE001 - a missing compiler is a row detail, not a failed benchmark
        print(f"P2: torch.compile side skipped ({type(exc).__name__}: {str(exc)[:120]})")
        return {}


def p2_spam(n_params: int, *, repeats: int = 7, num_threads: int | None = None, device: str = "cpu") -> dict:
    """AdamWPrune on the released AdamWSPAM base, clipping on, 50% mask / dense fused AdamW step; target <= 1.5.

    The gpt2-finewebedu-* defconfigs run this step. The base is stepped past SPAM's clipping
    window (``accu`` = 20 steps) first, so every timed step clips.
    """
    a, b = make_model(n_params, device=device), make_model(n_params, device=device)
    settings = OptimSettings("adamwprune", lr=SETTINGS.lr, weight_decay=SETTINGS.weight_decay, base="adamwspam",
                             spam_clip=True)
    prune_opt, dense = _masked(a, settings, warm_steps=settings.spam_accu), fused_adamw(b, fused=True)
    base = prune_opt.base
    with threads(num_threads) as used:
        ms = interleaved({"spam_fused_masked_step": prune_opt.step, "adamw_fused_dense": dense.step,
                          "spam_eager": _eager(prune_opt)}, repeats)
    detail = {**ms, "fused": prune_opt.fused, "threads": used, "spam_form": base.form,
              "clipping_at_last_step": base.released_schedule(base.spam_step)[1],
              "eager_over_dense": ms["spam_eager_ms"] / ms["adamw_fused_dense_ms"]}
    return _result("P2s AdamWPrune on SPAM (clip) step/AdamW fused",
                   ms["spam_fused_masked_step_ms"] / ms["adamw_fused_dense_ms"], 1.5, detail)


def p4_adamwprune(n_params: int, *, repeats: int = 0, num_threads: int | None = None) -> dict:
    """(weights + optimizer state + pruning buffers) / weights, bytes, after a 50% state-pruning update."""
    del repeats, num_threads  # a byte count, not a timing; the keywords keep the three parts alike
    model = make_model(n_params)
    opt = build_adamwprune(model, SETTINGS)
    assert isinstance(opt, AdamWPrune)
    opt.step()
    pruner = StatePruner(model, opt, PruneSettings(method="state", target=0.5, start=0, end=0, variant="bitter7"))
    pruner.set_total_steps(1)
    pruner.after_step(1)
    sb = memory.state_bytes(model, opt, pruner.buffer_bytes())
    ratio = (sb["weights"] + sb["optimizer_state"] + sb["pruning_buffers"]) / sb["weights"]
    detail = {**sb, "sparsity": pruner.sparsity(), "prunable": pruner.prunable_count()}
    return _result("P4 AdamWPrune memory (weights+state+buffers)/weights", ratio, 3.04, detail)


def _compacted(n_params: int, sparsity: float = 0.9, device: str = "cpu",
               compacted: bool = True) -> tuple[nn.Module, AdamWPrune, StatePruner, CompactState]:
    """AdamWPrune, fused masked step, its state pruned to ``sparsity`` by bitter7 at once, then compacted (or, with
    ``compacted`` False, the same left dense)."""
    model = make_model(n_params, device=device)
    opt = build_adamwprune(model, SETTINGS)
    assert isinstance(opt, AdamWPrune)
    opt.fused = masked_step.fusable(opt) and not kernels.why_unavailable(torch.device(device).type)
    opt.step()
    pruner = StatePruner(model, opt, PruneSettings(method="state", target=sparsity, start=0, end=0, variant="bitter7"))
    pruner.set_total_steps(1)
    pruner.after_step(1)
    state = CompactState(opt)
    left = state.compact_(dict(opt.masks)) if compacted else {}
    assert not left, f"P4s: weights left dense: {list(left.values())[:2]}"
    return model, opt, pruner, state


def p4s_memory(n_params: int, *, repeats: int = 0, num_threads: int | None = None) -> dict:
    """(weights + compact optimizer state + masks + offsets) / weights at 90% sparsity; target <= 1.3."""
    del repeats, num_threads  # a byte count, not a timing
    model, opt, pruner, state = _compacted(n_params)
    sb = memory.state_bytes(model, opt, pruner.buffer_bytes() + state.buffer_bytes())
    ratio = (sb["weights"] + sb["optimizer_state"] + sb["pruning_buffers"]) / sb["weights"]
    detail = {**sb, "offsets_bytes": state.buffer_bytes(), "sparsity": pruner.sparsity(),
              "compacted": len(state.layouts), "tensors": len(list(model.parameters()))}
    return _result("P4s AdamWPrune compact state at 90% (weights+state+buffers)/weights", ratio, 1.3, detail)


def p4s_step(n_params: int, *, repeats: int = 7, num_threads: int | None = None, device: str = "cpu") -> dict:
    """AdamWPrune's compact fused step at 90% sparsity / dense fused AdamW step; target <= 1.15. First one step of
    the compact and of the same dense-state optimizer, whose weights must agree to the bit."""
    model, opt = _compacted(n_params, device=device)[:2]
    dense_model, dense_opt = _compacted(n_params, device=device, compacted=False)[:2]
    opt.step()
    dense_opt.step()
    identical = all(torch.equal(a, b) for a, b in zip(model.parameters(), dense_model.parameters(), strict=True))
    del dense_model, dense_opt
    dense = fused_adamw(make_model(n_params, device=device), fused=True)
    with threads(num_threads) as used:
        ms = interleaved({"compact_step": opt.step, "adamw_fused_dense": dense.step}, repeats)
    kept = sum(w.kept for w in opt.compact.layouts.values())
    total = sum(p.numel() for p in model.parameters())
    detail = {**ms, "fused": opt.fused, "threads": used, "kept_fraction": kept / total,
              "bit_identical_to_dense": identical}
    return _result("P4s step: AdamWPrune compact step at 90%/AdamW fused",
                   ms["compact_step_ms"] / ms["adamw_fused_dense_ms"], 1.15, detail)


if __name__ == "__main__":
    # usage: bench_parts_adamwprune.py [n_params [threads]]
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 124_000_000
    count = int(sys.argv[2]) if len(sys.argv) > 2 else None
    for part in (p1, p2, p2_spam, p4_adamwprune, p4s_memory, p4s_step):
        print(json.dumps(part(n, num_threads=count), indent=1), flush=True)
