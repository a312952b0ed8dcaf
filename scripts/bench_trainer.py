"""P5: the harness trainer's training throughput against a bare PyTorch loop, side by side in one process.

Both train the same tiny GPT-2 (gpt2/model.py) on the same synthetic uint16
token shard with torch AdamW (fused kernel, decay on matrices only), gradient clipping 1.0,
the same micro-batch and the same torch thread count. The trainer side is
lib.train.trainer.train on a RunSpec; its summary's throughput counts training steps
only (evaluation, checkpoints and the test pass are outside it). The bare side
is the nanoGPT-style loop: random windows from a np.memmap, forward, backward,
clip, step. Rounds run the two back to back (ABBA order) after one warm-up
round; P5 is the median over rounds of trainer tokens/s / bare tokens/s (the
ratio of the two medians is reported alongside).

Target: P5 >= 0.97. Usage: python scripts/bench_trainer.py [--steps 10] [--repeats 7] [--out results/bench_trainer.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2.model import GPT, config_for  # noqa: E402
from gpt2.prepare import shard_dir, write_shards  # noqa: E402
from gpt2.sources import source_of  # noqa: E402
from lib.core import timing  # noqa: E402
from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings  # noqa: E402
from lib.train.trainer import train  # noqa: E402

TARGET = 0.97
LR, WEIGHT_DECAY, BETAS, CLIP = 6e-4, 0.1, (0.9, 0.95), 1.0


def make_data(data_dir: Path, vocab: int, train_tokens: int) -> Path:
    """Random token shards under data_dir (dataset "text"); returns the folder."""
    rng = np.random.default_rng(0)
    ids = {split: rng.integers(0, min(vocab, 50257), n) for split, n in
           (("train", train_tokens), ("val", 4096), ("test", 4096))}
    out = shard_dir(data_dir, "text")
    write_shards(out, ids, dataset="text", source=source_of("text", data_dir / "synthetic"), token_budget=10**12)
    return out


def make_spec(data_dir: Path, args: argparse.Namespace) -> RunSpec:
    options = {"size": "tiny", "dataset": "text", "block_size": args.block, "vocab_size": args.vocab,
               "token_budget": 10**12, "text_dir": str(data_dir / "synthetic")}
    return RunSpec(
        name="bench_trainer", model="gpt2", seed=1,
        optim=OptimSettings("adamw", LR, WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1]),
        prune=PruneSettings(),
        train=TrainSettings(batch_size=args.batch, max_iters=args.steps, min_lr_ratio=1.0, grad_clip=CLIP,
                            eval_interval=args.steps, eval_batches=1, log_interval=args.steps,
                            deterministic=False, keep_checkpoints=False),
        hardware=HardwarePlan(device="cpu", micro_batch=args.batch, grad_accum=1, threads=torch.get_num_threads()),
        model_options=options, data_dir=str(data_dir),
    )


def trainer_tokens_per_s(spec: RunSpec, work: Path, round_no: int) -> float:
    run_dir = work / f"run{round_no}"
    run_dir.mkdir()
    summary = train(spec, run_dir)
    if summary["status"] != "ok":
        raise RuntimeError(f"trainer run {round_no}: {summary['status']} ({summary['error']})")
    return summary["throughput"]["value"]


def bare_tokens_per_s(shard: Path, args: argparse.Namespace, seed: int) -> float:
    """The reference: a plain loop with no harness around it."""
    torch.manual_seed(seed)
    model = GPT(config_for("tiny", args.vocab, args.block))
    tables = {id(model.wte.weight), id(model.wpe.weight)}  # embeddings and norms/biases: no decay
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
    rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in tables]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)  # the kernel lib/optim/adamw.py picks
    rng = np.random.default_rng(seed)
    elapsed = 0.0
    model.train()
    for _ in range(args.steps):
        start = time.perf_counter()
        data = np.memmap(shard, dtype=np.uint16, mode="r")
        ix = rng.integers(0, len(data) - args.block, size=args.batch)
        w = torch.from_numpy(np.stack([data[i:i + args.block + 1] for i in ix]).astype(np.int64))
        x, y = w[:, :-1], w[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError("bare loop diverged")
    return args.steps * args.batch * args.block / elapsed


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("name", "value", "target", "met")
    cells = [cols] + [(r["name"], f"{r['value']:.4g}", r["target"], r["met"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(cols))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate trainer and bare rounds; print the table; write and return the JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer, bare = [], []
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        work = Path(tmp)
        shard = make_data(work / "data", args.vocab, args.train_tokens) / "train.bin"
        spec = make_spec(work / "data", args)
        for i in range(args.repeats + 1):  # round 0 warms up both sides and is not counted
            # ABBA order: a load that drifts during a round hurts both sides alike on average
            if i % 2:
                b = bare_tokens_per_s(shard, args, seed=i)
                t = trainer_tokens_per_s(spec, work, i)
            else:
                t = trainer_tokens_per_s(spec, work, i)
                b = bare_tokens_per_s(shard, args, seed=i)
            if i:
                trainer.append(t)
                bare.append(b)
            print(f"round {i}{' (warm-up)' if not i else ''}: trainer {t:,.0f} tokens/s, bare {b:,.0f} tokens/s, "
                  f"ratio {t / b:.3f}", flush=True)
    # The median of per-round ratios: each pair ran back to back, so a machine whose load changes
    # between rounds (other jobs) moves both numbers of a pair together and the ratio little.
    ratio = statistics.median(t / b for t, b in zip(trainer, bare, strict=True))
    of_medians = statistics.median(trainer) / statistics.median(bare)
    setup = (f"tiny GPT-2 (4x128), vocab {args.vocab}, {args.batch}x{args.block} tokens/step, {args.steps} steps "
             f"per round, {args.repeats} rounds, {torch.get_num_threads()} thread(s)")
    check = timing.summary({"trainer": trainer, "bare": bare}, "tokens/s")
    rows = [
        {"name": "trainer tokens/s (median)", "value": statistics.median(trainer), "target": "", "met": "",
         "detail": json.dumps(trainer)},
        {"name": "bare loop tokens/s (median)", "value": statistics.median(bare), "target": "", "met": "",
         "detail": json.dumps(bare)},
        {"name": "P5 trainer / bare", "value": ratio, "target": f">= {TARGET}",
         "met": "yes" if ratio >= TARGET else "no", "timing": check,
         "detail": f"median of per-round ratios; ratio of medians {of_medians:.3f}; {setup}{timing.mark(check)}"},
    ]
    print(table(rows))
    print(f"  {setup}; load average {check['load_avg_1min']:.2f} on {check['cores']} core(s)"
          f"{timing.mark(check) or ', spread within 25 %'}")
    data = {"benchmark": "bench_trainer", "setup": setup, "steps": args.steps, "repeats": args.repeats,
            "batch": args.batch, "block": args.block, "vocab": args.vocab, "threads": torch.get_num_threads(),
            "rounds": {"trainer": trainer, "bare": bare}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round and side")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up round")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--block", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary rows (GPT-2 padded: 50304)")
    parser.add_argument("--train-tokens", type=int, default=200_000, help="tokens in the synthetic train shard")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_trainer.json")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
