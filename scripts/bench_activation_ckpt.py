"""Activation checkpointing policies (lib/hardware/actckpt.py) side by side: memory and time against none.

Workloads: the tiny GPT (4 blocks of width 128, vocabulary 256, batch 8 x 64 tokens), GPT-2
124M at a short block (vocabulary 50304, batch 4 x 128 tokens) and ResNet-18 on CIFAR-sized
images (batch 32 x 3 x 32 x 32), in float32. Policies: none, uniform (every 2nd block),
sqrt, selective, and budget (halfway between none's estimated peak and checkpointing every
block).

For each: the activation bytes one forward leaves saved for backward, measured (glibc's
malloc count on the CPU, the CUDA allocator on a GPU; lib/actckpt.activation_bytes, after a
warm-up), the plan's estimate of them (lib/memory's profile by block), the estimated peak
(plus the largest recomputed segment), and the forward+backward time. Rounds interleave the
policies (none, uniform, sqrt, ..., none, uniform, ...) after one warm-up round; medians.
On a GPU the allocator's peak over the step is measured too.

Target (issue 13): sqrt at most 0.5x none's activation bytes at no more than 1.4x its time.
Usage: python scripts/bench_activation_ckpt.py [--repeats 3] [--only tiny] [--out results/bench_activation_ckpt.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2.model import GPT, config_for  # noqa: E402
from lib.core import timing  # noqa: E402
from lib.hardware import actckpt, memory  # noqa: E402
from lib.hardware.actckpt import Segment  # noqa: E402
from resnet.model import resnet18  # noqa: E402

POLICIES = ("none", "uniform", "sqrt", "selective", "budget")
TARGET_MEMORY, TARGET_TIME = 0.5, 1.4


def workloads(device: torch.device) -> dict[str, Callable[[], tuple[nn.Module, list[nn.Module], Callable]]]:
    """name -> builder of (model, its blocks, loss function of the model)."""
    def gpt(size: str, batch: int, block: int, vocab: int) -> Callable:
        def build() -> tuple[nn.Module, list[nn.Module], Callable]:
            torch.manual_seed(0)
            model = GPT(config_for(size, vocab_size=vocab, block_size=block)).to(device)
            tokens = torch.randint(0, vocab, (batch, block + 1), device=device)

            def loss(m: nn.Module) -> torch.Tensor:
                logits = m(tokens[:, :-1])
                return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
            return model, list(model.h), loss
        return build

    def resnet() -> tuple[nn.Module, list[nn.Module], Callable]:
        torch.manual_seed(0)
        model = resnet18(num_classes=10).to(device)
        images, labels = torch.randn(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device)
        blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
        return model, blocks, lambda m: F.cross_entropy(m(images), labels)

    return {"tiny GPT (8x64 tokens)": gpt("tiny", 8, 64, 256), "GPT-2 124M (4x128 tokens)": gpt("124m", 4, 128, 50304),
            "ResNet-18 (32x 32x32)": resnet}


def segments_for(policy: str, blocks: list[nn.Module], profile: memory.BlockProfile) -> list[Segment]:
    every_block = [Segment(i, i) for i in range(len(blocks))]
    budget = (actckpt.peak_saved(every_block, profile) + actckpt.peak_saved([], profile)) / 2
    return actckpt.choose(policy, len(blocks), every=2, budget=budget, profile=profile)


def measure(build: Callable, device: torch.device, repeats: int) -> list[dict]:
    model, blocks, loss_of = build()
    profile = memory.profile(model, blocks, lambda: loss_of(model))
    model.zero_grad(set_to_none=True)
    plans = {p: segments_for(p, blocks, profile) for p in POLICIES}
    seen: dict[str, dict[str, list[float]]] = {p: {"bytes": [], "s": [], "peak": []} for p in POLICIES}
    for round_ in range(repeats + 1):  # round 0 warms up: first passes allocate lasting caches
        for policy in POLICIES:
            actckpt.apply(blocks, plans[policy])
            try:
                seen_now = _one(model, loss_of, device)
            finally:
                actckpt.remove(blocks)
            if round_:
                for key, value in seen_now.items():
                    seen[policy][key].append(value)
    rows = []
    for policy in POLICIES:
        m = {k: statistics.median(v) if v and None not in v else None for k, v in seen[policy].items()}
        rows.append({"policy": policy, "segments": actckpt.describe(plans[policy], len(blocks)),
                     "measured_bytes": m["bytes"], "estimated_bytes": actckpt.forward_saved(plans[policy], profile),
                     "estimated_peak_bytes": actckpt.peak_saved(plans[policy], profile),
                     "cuda_peak_bytes": m["peak"], "seconds": m["s"]})
    none = rows[0]
    check = timing.summary({policy: seen[policy]["s"] for policy in POLICIES})  # the time ratios' spread and load
    for row in rows:
        row["memory_ratio"] = row["measured_bytes"] / none["measured_bytes"] if none["measured_bytes"] else None
        row["time_ratio"] = row["seconds"] / none["seconds"]
        row["timing"] = check
    return rows


def _one(model: nn.Module, loss_of: Callable, device: torch.device) -> dict[str, float | None]:
    """One forward+backward: bytes left saved after the forward, time, and the CUDA peak over the step."""
    model.zero_grad(set_to_none=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    saved = actckpt.activation_bytes(lambda: loss_of(model), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"bytes": saved, "s": seconds, "peak": peak}


def table(results: dict[str, list[dict]]) -> str:
    mib = 2**20
    lines = [f"{'workload':28} {'policy':10} {'segments':28} {'measured':>9} {'estimate':>9} {'est.peak':>9} "
             f"{'mem/none':>8} {'time':>8} {'time/none':>9}"]
    for name, rows in results.items():
        for r in rows:
            measured = f"{r['measured_bytes'] / mib:8.1f}M" if r["measured_bytes"] is not None else "       -"
            ratio = f"{r['memory_ratio']:8.3f}" if r["memory_ratio"] is not None else "       -"
            lines.append(f"{name:28} {r['policy']:10} {r['segments']:28} {measured:>9} "
                         f"{r['estimated_bytes'] / mib:8.1f}M {r['estimated_peak_bytes'] / mib:8.1f}M {ratio:>8} "
                         f"{r['seconds'] * 1000:6.0f}ms {r['time_ratio']:9.3f}")
    return "\n".join(lines)


def verdicts(results: dict[str, list[dict]]) -> list[str]:
    """The sqrt target, per workload."""
    out = []
    for name, rows in results.items():
        sqrt = next(r for r in rows if r["policy"] == "sqrt")
        mem, t = sqrt["memory_ratio"], sqrt["time_ratio"]
        met = "?" if mem is None else "yes" if mem <= TARGET_MEMORY and t <= TARGET_TIME else "no"
        out.append(f"{name}: sqrt memory {'-' if mem is None else f'{mem:.3f}'}x (<= {TARGET_MEMORY}) at time "
                   f"{t:.3f}x (<= {TARGET_TIME}): met {met}{timing.mark(sqrt.get('timing'))}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="run the workloads whose name contains this text (e.g. tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_activation_ckpt.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chosen = {k: v for k, v in workloads(device).items() if not args.only or args.only.lower() in k.lower()}
    if not chosen:
        print(f"error: --only {args.only!r} matches no workload ({', '.join(workloads(device))})", file=sys.stderr)
        return 2
    results = {name: measure(build, device, args.repeats) for name, build in chosen.items()}
    print(f"Activation checkpointing on {device} ({torch.get_num_threads()} threads), float32, medians of "
          f"{args.repeats} interleaved rounds:")
    print(table(results))
    print("\n".join(verdicts(results)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                    "repeats": args.repeats, "results": results,
                                    "verdicts": verdicts(results)}, indent=2))
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
