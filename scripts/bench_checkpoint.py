"""The cost of a training checkpoint (lib/checkpoint) for GPT-2 124M on this machine.

Builds GPT-2 124M (gpt2/model.py) with AdamW and magnitude pruning at 50 % (so the
optimizer moments and the bit-packed masks exist), takes one real training step on a
short random batch, then, alternating in one process: that training step, writing one
training checkpoint through lib/checkpoint's manager (tmp, fsync, rename, `latest`),
and loading it back with its SHA-256 check; beside each, on the same disk, the same payload
through bare torch.save + fsync and bare torch.load. Reports medians, the checkpoint's size
relative to the fp32 weights, the write time relative to the training step, the harness's write
and load (with verification) relative to the bare ones, and the peak memory of a fresh process
that loads the checkpoint, relative to the file's size, beside one that loads the bare file.

What to expect of the size: weights + two AdamW moments (3x the weights) plus 1 bit per
prunable weight for the masks, plus the RNG states and counters (kilobytes).

Usage: python scripts/bench_checkpoint.py [--size 124m] [--repeats 3] [--out results/bench_checkpoint.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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
    times: dict[str, list[float]] = {"train_step_s": [], "write_s": [], "bare_write_s": [], "load_verify_s": [],
                                     "bare_load_s": []}
    size_bytes, path, bare = 0, where, where / "bare.pt"
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        _step(model, optimizer, pruner, batch)
        times["train_step_s"].append(time.perf_counter() - t0)
        progress = ckpt_state.Progress(step=step, provisional=10, micro_batch=1, grad_accum=1)
        payload = ckpt_state.payload(progress, {"model": "gpt2"}, model, optimizer, pruner, scaler)
        for side in (("harness", "bare") if step % 2 else ("bare", "harness")):  # alternate who goes first
            t0 = time.perf_counter()
            if side == "harness":
                path = manager.save(step, payload)
                times["write_s"].append(time.perf_counter() - t0)
            else:
                _bare_save(payload, bare)
                times["bare_write_s"].append(time.perf_counter() - t0)
        size_bytes = path.stat().st_size
        for side in (("harness", "bare") if step % 2 else ("bare", "harness")):
            t0 = time.perf_counter()
            if side == "harness":
                load(path)
                times["load_verify_s"].append(time.perf_counter() - t0)
            else:
                torch.load(bare, map_location="cpu", weights_only=True)
                times["bare_load_s"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    peak = {"harness": _peak_load_bytes(path, "harness"), "bare": _peak_load_bytes(bare, "bare")}
    return {
        "size": size, "block": block, "repeats": repeats, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
        "checkpoint_bytes": size_bytes, "size_over_weights": size_bytes / weights,
        **median, "write_over_train_step": median["write_s"] / median["train_step_s"],
        "write_over_bare": median["write_s"] / median["bare_write_s"],
        "load_over_bare": median["load_verify_s"] / median["bare_load_s"],
        "peak_load_bytes": peak, "peak_rss_over_file": peak["harness"] / size_bytes,
        "bare_peak_rss_over_file": peak["bare"] / bare.stat().st_size, "rounds": times,
        "timing": timing.summary(times),
        "where": str(where),
    }


def _bare_save(payload: dict, path: Path) -> None:
    """What the harness's write is compared with: torch.save to the path, then fsync."""
    torch.save(payload, path)
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


PEAK = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from lib.checkpoint import load
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
before = kib("VmRSS")
state = load(sys.argv[1]) if sys.argv[2] == "harness" else torch.load(sys.argv[1], map_location="cpu",
                                                                       weights_only=True)
print((kib("VmHWM") - before) * 1024)
"""


def _peak_load_bytes(path: Path, side: str) -> int:
    """The growth of a fresh process's peak resident memory while it loads ``path`` (the state it holds
    afterwards included): one copy of the state is the floor."""
    done = subprocess.run([sys.executable, "-c", PEAK, str(path), side, str(ROOT)], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1])


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
    print(f"  beside bare torch.save + fsync ({result['bare_write_s']:.2f} s) and bare torch.load "
          f"({result['bare_load_s']:.2f} s) on the same disk: write {result['write_over_bare']:.2f}x, load with "
          f"verification {result['load_over_bare']:.2f}x; peak memory of a process loading it "
          f"{result['peak_rss_over_file']:.2f}x the file (bare torch.load {result['bare_peak_rss_over_file']:.2f}x)")
    check = result["timing"]
    print(f"  medians of {result['repeats']} rounds on {result['threads']} threads, load average "
          f"{check['load_avg_1min']:.2f} on {check['cores']} core(s){timing.mark(check)}; raw rounds in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
