"""Checkpoint-time surgery measured: the cost of structure statistics, and what a cut saves.
(docs/algorithms.md, "Structure statistics and surgery")

1. Statistics overhead (target, issue 14: at most 2 % of a training step on the tiny GPT).
   The tiny GPT as `make defconfig-gpt2-tiny-surgery` trains it (vocabulary 50304, block 128,
   micro-batch 8, AdamW, float32). Rounds interleave a plain training step (forward, backward,
   AdamW step) with the same step plus lib/surgery/stats.record (gradient reductions and one
   hooked no-grad forward); medians after a warm-up round. Steps between records cost exactly
   nothing extra (no hooks), so the overhead at CONFIG_STRUCTURE_STATS_EVERY=N is the extra
   time of one recorded step divided by N steps.
2. Before and after surgery, per family: the tiny GPT, GPT-2 124M (block 128, micro-batch 4),
   ResNet-18 (CIFAR-10, micro-batch 8)
   and LeNet-5 (micro-batch 8), each after 2 AdamW steps with statistics, cut by 30 % of
   every layer's structures (lowest statistics score first; GPT-2 heads and neurons, ResNet
   channels inside blocks and of the residual streams, LeNet channels and units) with
   lib/surgery/cut.py and measured with lib/surgery/measure.py: parameters, checkpoint bytes,
   optimizer-state bytes, training memory (state + saved activations of one micro-batch, counted)
   and no-grad forward latency at batch 1 and 16 (medians of 5, interleaved).

Usage: python scripts/bench_surgery.py [--repeats 7] [--out results/bench_surgery.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.core import timing  # noqa: E402
from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings  # noqa: E402
from lib.core.task import get_task  # noqa: E402
from lib.optim import build_optimizer  # noqa: E402
from lib.pruning import build_pruner  # noqa: E402
from lib.surgery import measure as surgery_measure  # noqa: E402
from lib.surgery.command import Trained, lowest_units, smaller  # noqa: E402
from lib.surgery.stats import StructureStats  # noqa: E402

TARGET_OVERHEAD = 0.02
FRACTION = 0.3
FAMILIES = {  # model, options, micro-batch
    "tiny GPT": ("gpt2", {"size": "tiny", "dataset": "pydoc", "block_size": 128}, 8),
    "GPT-2 124M": ("gpt2", {"size": "124m", "dataset": "pydoc", "block_size": 128}, 4),
    "ResNet-18": ("resnet18", {"dataset": "cifar10"}, 8),
    "LeNet-5": ("lenet5", {"dataset": "mnist5k"}, 8),
}


def spec_for(model: str, options: dict, micro: int) -> RunSpec:
    return RunSpec(name=model, model=model, seed=0, optim=OptimSettings("adamw", 1e-3, 0.0), prune=PruneSettings(),
                   train=TrainSettings(batch_size=micro, max_iters=1),
                   hardware=HardwarePlan(device="cpu", micro_batch=micro, grad_accum=1), model_options=options)


def random_batch(spec: RunSpec, n: int) -> tuple[torch.Tensor, ...]:
    """Random tokens (GPT-2) or random images with labels 0, shaped as the task trains on."""
    torch.manual_seed(1)
    x, y = get_task(spec.model).example_batch(spec, n, torch.device("cpu"))
    if x.dtype == torch.int64:
        return torch.randint(0, 50257, x.shape), torch.randint(0, 50257, y.shape)
    return torch.randn_like(x), y


def trained(spec: RunSpec, batch: tuple) -> tuple[Trained, StructureStats]:
    """A model after 2 AdamW steps on ``batch``, with statistics recorded on both."""
    task = get_task(spec.model)
    torch.manual_seed(0)
    model = task.build_model(spec)
    optimizer = build_optimizer(model, spec.optim)
    stats = StructureStats(model, every=1)
    for _ in range(2):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        stats.record(lambda: task.loss(model, batch))
        optimizer.step()
    return Trained(model, optimizer, build_pruner(model, optimizer, spec.prune)), stats


def statistics_overhead(repeats: int) -> dict:
    name, options, micro = FAMILIES["tiny GPT"]
    spec = spec_for(name, options, micro)
    task = get_task(name)
    batch = random_batch(spec, micro)
    old, stats = trained(spec, batch)
    model, optimizer = old.model, old.optimizer

    def step(record: bool) -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        if record:
            stats.record(lambda: task.loss(model, batch))
        optimizer.step()
        return time.perf_counter() - start

    plain, recorded = [], []
    step(False), step(True)  # warm-up
    for _ in range(repeats):
        plain.append(step(False))
        recorded.append(step(True))
    extra = statistics.median(recorded) / statistics.median(plain) - 1
    every = next(n for n in range(1, 10_000) if extra / n <= TARGET_OVERHEAD)
    return {"step_s": statistics.median(plain), "recorded_step_s": statistics.median(recorded),
            "extra_per_recorded_step": extra, "overhead_at_every_10": extra / 10,
            "smallest_every_within_target": every, "timing": timing.summary({"plain": plain, "recorded": recorded})}


def cut_family(label: str) -> dict:
    name, options, micro = FAMILIES[label]
    spec = spec_for(name, options, micro)
    task = get_task(name)
    old, stats = trained(spec, random_batch(spec, micro))
    removed = lowest_units(stats, FRACTION, "all", type(old.model).__name__)
    cut, new = smaller(task, spec, old, removed, [])
    payloads = [{"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict()} for t in (old, new)]
    measured = surgery_measure.before_after(task, spec, (old, payloads[0]), (new, payloads[1]))
    return {"removed": cut.counts(), "measured": measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_surgery.json")
    args = parser.parse_args(argv)
    overhead = statistics_overhead(args.repeats)
    print(f"Structure statistics on the tiny GPT (CPU, {torch.get_num_threads()} threads, float32, medians of "
          f"{args.repeats} interleaved rounds): a training step {1000 * overhead['step_s']:.1f} ms, with a record "
          f"{1000 * overhead['recorded_step_s']:.1f} ms (+{100 * overhead['extra_per_recorded_step']:.1f} %); "
          f"at STRUCTURE_STATS_EVERY=10 {100 * overhead['overhead_at_every_10']:.2f} % of a step; within "
          f"{100 * TARGET_OVERHEAD:g} % from every {overhead['smallest_every_within_target']} steps"
          f"{timing.mark(overhead['timing'])}")
    cuts = {label: cut_family(label) for label in FAMILIES}
    for label, result in cuts.items():
        removed = ", ".join(f"{n} {k}s" for k, n in result["removed"].items())
        print(f"\n{label}, {100 * FRACTION:g} % of each layer's structures removed ({removed}):")
        print(surgery_measure.table({"measured": result["measured"], "val_loss": None}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "repeats": args.repeats,
                                    "statistics": overhead, "cuts": cuts}, indent=2))
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
