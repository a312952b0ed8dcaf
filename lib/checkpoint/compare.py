"""Whether two runs of one spec are the same run to the bit: a resumed run against an uninterrupted one.

Compared: every milestone checkpoint's model, optimizer, pruner, scaler, RNG states and step, the
progress counters (timings aside), best.pt, every logged metric and the summary's results. Used by
the resume tests (tests/checkpoint/test_resume.py) and by `make gpu-check`'s exact-resume part on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lib.checkpoint.format import load
from lib.checkpoint.manager import read_shards

TIMING = ("time", "elapsed", "rss", "memory", "allocated", "throughput", "wall", "started")
UNTIMED_PROGRESS = ("train_time", "wall_before", "log_offsets", "resumed_from")
SUMMARY_KEYS = ("status", "best", "test_at_best", "sparsity", "steps", "flags")


def equal(a: Any, b: Any) -> bool:
    """Bit-equal: tensors by dtype, shape and value; containers element by element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def logs(run_dir: Path) -> list[list[dict]]:
    """metrics.jsonl and train.jsonl without their timing fields."""
    return [[_untimed(json.loads(line)) for line in (run_dir / name).read_text().splitlines()]
            for name in ("metrics.jsonl", "train.jsonl")]


def _untimed(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not any(t in k for t in TIMING)}


def run_differences(reference: Path, resumed: Path) -> list[str]:
    """What differs between two run folders (empty: the same run to the bit)."""
    found: list[str] = []
    names = sorted(p.name for p in (reference / "checkpoints" / "milestones").glob("*.ckpt"))
    theirs = sorted(p.name for p in (resumed / "checkpoints" / "milestones").glob("*.ckpt"))
    if names != theirs:
        found.append(f"milestones {names} vs {theirs}")
    for name in sorted(set(names) & set(theirs)):
        a, b = (load(d / "checkpoints" / "milestones" / name) for d in (reference, resumed))
        found += [f"{name}: {key}" for key in ("model", "optimizer", "pruner", "scaler", "rng", "step", "sharded")
                  if not equal(a.get(key), b.get(key))]
        if "sharded" in a:  # FSDP2: the weights, optimizer state and masks are in the shards beside the file
            shards = [read_shards(d / "checkpoints" / "milestones" / name) for d in (reference, resumed)]
            found += [f"{name}: shards' {key}" for key in ("model", "optimizer", "masks")
                      if not equal(shards[0].get(key), shards[1].get(key))]
        progress = [{k: v for k, v in p["progress"].items() if k not in UNTIMED_PROGRESS} for p in (a, b)]
        if progress[0] != progress[1]:
            found.append(f"{name}: progress")
    if not equal(*(load(d / "checkpoints" / "best.pt") for d in (reference, resumed))):
        found.append("best.pt")
    if logs(reference) != logs(resumed):
        found.append("metrics.jsonl / train.jsonl")
    ours, other = (json.loads((d / "summary.json").read_text()) for d in (reference, resumed))
    found += [f"summary {key}" for key in SUMMARY_KEYS if ours.get(key) != other.get(key)]
    return found
