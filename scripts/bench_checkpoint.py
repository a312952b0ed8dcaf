"""The cost of a training checkpoint (lib/checkpoint) for GPT-2 124M on this machine.

Builds GPT-2 124M (gpt2/model.py) with AdamW and magnitude pruning at 50 % (so the
optimizer moments and the bit-packed masks exist), takes one real training step on a
short random batch, then, alternating in one process: that training step, writing one
training checkpoint through lib/checkpoint's manager (tmp, fsync, rename, `latest`),
and loading it back with its SHA-256 check. Reports medians, the checkpoint's size
relative to the fp32 weights, and the write time relative to the training step
(both measured here, side by side).

What to expect of the size: weights + two AdamW moments (3x the weights) plus 1 bit per
prunable weight for the masks, plus the RNG states and counters (kilobytes).

Usage: python scripts/bench_checkpoint.py [--size 124m] [--repeats 3] [--out results/bench_checkpoint.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2.model import GPT, config_for  # noqa: E402
from lib.checkpoint import load  # noqa: E402
from lib.checkpoint import state as ckpt_state  # noqa: E402
from lib.checkpoint.manager import Manager, Policy  # noqa: E402
from lib.core import timing  # noqa: E402
from lib.core.spec import OptimSettings, PruneSettings  # noqa: E402
from lib.optim import build_optimizer  # noqa: E402
from lib.pruning import build_pruner  # noqa: E402


def _step(model: GPT, optimizer: torch.optim.Optimizer, pruner, batch: torch.Tensor) -> None:
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    loss.backward()
    pruner.before_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(size: str, repeats: int, where: Path, block: int = 64) -> dict:
    torch.manual_seed(0)
    cfg = config_for(size, block_size=block)
    model = GPT(cfg)
    optimizer = build_optimizer(model, OptimSettings("adamw", 6e-4, 0.1))
    pruner = build_pruner(model, optimizer, PruneSettings(method="magnitude", target=0.5, start=0, end=1,
                                                           frequency=1))
    pruner.set_total_steps(10)
    batch = torch.randint(0, cfg.vocab_size, (1, block + 1))
    _step(model, optimizer, pruner, batch)
    pruner.prune_to(0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    manager = Manager(where, Policy(interval=1, keep_last=1), say=lambda line: None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    times: dict[str, list[float]] = {"train_step_s": [], "write_s": [], "load_verify_s": []}
    size_bytes = 0
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        _step(model, optimizer, pruner, batch)
        times["train_step_s"].append(time.perf_counter() - t0)
        progress = ckpt_state.Progress(step=step, provisional=10, micro_batch=1, grad_accum=1)
        t0 = time.perf_counter()
        path = manager.save(step, ckpt_state.payload(progress, {"model": "gpt2"}, model, optimizer, pruner, scaler))
        times["write_s"].append(time.perf_counter() - t0)
        size_bytes = path.stat().st_size
        t0 = time.perf_counter()
        load(path)
        times["load_verify_s"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size, "block": block, "repeats": repeats, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
        "checkpoint_bytes": size_bytes, "size_over_weights": size_bytes / weights,
        **median, "write_over_train_step": median["write_s"] / median["train_step_s"], "rounds": times,
        "timing": timing.summary(times),
        "where": str(where),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="124m", help="GPT-2 size (tiny for a quick check)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_checkpoint.json"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=out.parent))  # the results disk, not tmpfs
    try:
        result = measure(args.size, args.repeats, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    print(f"GPT-2 {result['size']}: {result['parameters']:,} parameters, "
          f"weights {result['weights_bytes'] / mib:.0f} MiB")
    print(f"  checkpoint {result['checkpoint_bytes'] / mib:.0f} MiB = {result['size_over_weights']:.3f} x the weights")
    print(f"  write (tmp + fsync + rename + latest) {result['write_s']:.2f} s; load + SHA-256 check "
          f"{result['load_verify_s']:.2f} s; one training step (1 x {result['block']} tokens) "
          f"{result['train_step_s']:.2f} s; write / step = {result['write_over_train_step']:.2f}")
    check = result["timing"]
    print(f"  medians of {result['repeats']} rounds on {result['threads']} threads, load average "
          f"{check['load_avg_1min']:.2f} on {check['cores']} core(s){timing.mark(check)}; raw rounds in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
