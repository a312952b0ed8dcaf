"""Pruning benchmarks on the CPU, each figure a ratio measured side by side in one process.

The workload is GPT-2 124M's weight matrices as bias-free Linear layers: 12
blocks of [768x2304 (attention qkv), 768x768 (attention out), 768x3072 (MLP
in), 3072x768 (MLP out)] = 84.9M, plus one 50304x768 matrix (the vocabulary
head, untied here) = 123.6M weights in 49 tensors, all prunable so that the
threshold sees ~124M scores. ``--scale s`` scales every dimension by sqrt(s)
(about s x 124M weights) for a quick run.

Rows (value, target):
  P3   exact global threshold time / sampled threshold time (>= 40): the time
       to find the cut value from a list of ~124M scores (|w|), masks not
       included. "exact" is lib's (one flat copy, partitioned in place); the
       detail also gives torch.cat + torch.kthvalue, timed after the A/B pairs.
       Plus the sampled cut's mean (bias) and worst sparsity error over
       ``--draws`` seeds, in percentage points (<= 0.02 / <= 0.1).
  P3b  one whole mask update (|w| scores tensor by tensor, sampled threshold,
       masks applied to weights and AdamW state) / one fused torch AdamW step (<= 3).
  P4   (weights + optimizer state + pruning buffers) / weights, in bytes, with
       AdamW state: movement (<= 4.04) and magnitude (<= 3.04).
  P1, P2, P2s, P4 adamwprune, P4s (compact state at 90 %, memory and step):
       from scripts/bench_parts_adamwprune.py when present.

Timings interleave the candidates (A, B, A, B, ...) after one warm-up round
and report medians; on a shared 2-core machine they are noisy.
Usage: python scripts/bench_pruning.py [--scale 1.0] [--out results/bench_pruning.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.core import timing  # noqa: E402
from lib.core.spec import PruneSettings  # noqa: E402
from lib.hardware.memory import peak, tensor_bytes  # noqa: E402
from lib.pruning import build_pruner  # noqa: E402
from lib.pruning.threshold import BLOCK, exact_value, sample_size, sampled_value  # noqa: E402

LAYERS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of each Linear in a block
HEAD = (768, 50304)
SPARSITY = 0.5  # where the sampling error is largest: sqrt(s (1 - s) / m) peaks at s = 0.5
PARTS = ROOT / "scripts" / "bench_parts_adamwprune.py"
PART_NAMES = ("p1", "p2", "p2_spam", "p4_adamwprune", "p4s_memory", "p4s_step")


def gpt2_like(scale: float = 1.0) -> nn.Module:
    """GPT-2 124M's Linear weights (no biases), every dimension scaled by sqrt(scale)."""
    r = math.sqrt(scale)
    shapes = LAYERS * 12 + [HEAD]
    model = nn.Sequential(*(nn.Linear(max(1, round(i * r)), max(1, round(o * r)), bias=False) for i, o in shapes))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


LAST_TIMING: dict[str, Any] = {}  # the spread and load of the latest interleaved() (lib/timing.summary)


def interleaved(fns: list[Callable[[int], object]], repeats: int) -> list[float]:
    """Median seconds of each fn(i), run in turn (A, B, A, B, ...) after one warm-up round; their spread and the
    load are left in LAST_TIMING for the row that reports them."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn(i)
            if i:
                out.append(time.perf_counter() - start)
    LAST_TIMING.clear()
    LAST_TIMING.update(timing.summary({f"side {k}": t for k, t in enumerate(times)}))
    return [statistics.median(t) for t in times]


def row(name: str, value: float | None, target: str, detail: str, check: dict | None = None) -> dict[str, Any]:
    """One table row; ``check`` is its timing's spread, load and verdict (lib/timing.summary)."""
    return {"name": name, "value": value, "target": target, "met": met(value, target),
            "detail": detail + timing.mark(check), **({"timing": check} if check else {})}


def met(value: Any, target: Any) -> str:
    """"yes"/"no" for a target written ">= x" or "<= x" (a bare number is an upper bound); else "?"."""
    if isinstance(target, int | float) and not isinstance(target, bool):
        target = f"<= {target}"
    if not isinstance(value, int | float) or not isinstance(target, str):
        return "?"
    text = target.replace("≥", ">=").replace("≤", "<=").strip()
    try:
        bound = float(text[2:].strip().rstrip("x"))
    except ValueError:
        return "?"
    if text.startswith(">="):
        return "yes" if value >= bound else "no"
    if text.startswith("<="):
        return "yes" if value <= bound else "no"
    return "?"


def p3(model: nn.Module, repeats: int, draws: int) -> list[dict[str, Any]]:
    """Exact vs sampled global threshold over all scores, and the sampled cut's sparsity error."""
    scores = [p.detach().abs() for p in model.parameters()]
    total = sum(s.numel() for s in scores)
    size = sample_size(SPARSITY)

    def kthvalue_on_cat(_: int) -> float:  # the predecessor's exact cut
        return torch.cat([s.reshape(-1) for s in scores]).kthvalue(round(SPARSITY * total)).values.item()

    exact, sampled = interleaved(
        [lambda i: exact_value(scores, SPARSITY), lambda i: sampled_value(scores, SPARSITY, seed=i)], repeats)
    first = dict(LAST_TIMING)
    textbook, sampled2 = interleaved([kthvalue_on_cat, lambda i: sampled_value(scores, SPARSITY, seed=i)],
                                     max(1, repeats // 2))
    second = dict(LAST_TIMING)
    errors = []
    for seed in range(draws):
        cut = sampled_value(scores, SPARSITY, seed=1000 + seed)
        errors.append(100 * (sum(int((s <= cut).sum()) for s in scores) / total - SPARSITY))
    bias, worst = statistics.mean(errors), max(abs(e) for e in errors)
    where = (f"{total / 1e6:.1f}M scores, sparsity {SPARSITY}, sample {size / 1e6:.2f}M scores "
             f"({size / total:.1%}, blocks of {BLOCK}), {draws} draws")
    return [
        row("P3 exact / sampled threshold time", exact / sampled, ">= 40",
            f"exact {exact * 1e3:.0f} ms (in-place partition), sampled {sampled * 1e3:.1f} ms; {where}", first),
        row("P3 cat+kthvalue / sampled threshold time", textbook / sampled2, ">= 80",
            f"torch.cat + kthvalue {textbook * 1e3:.0f} ms, sampled {sampled2 * 1e3:.1f} ms (the predecessor's cut)",
            second),
        row("P3 sampled mean sparsity error (points)", abs(bias), "<= 0.02",
            f"signed mean {bias:+.4f}, sd {statistics.pstdev(errors):.4f}; {where}"),
        row("P3 sampled worst sparsity error (points)", worst, "<= 0.1", where),
    ]


def adamw_with_grads(model: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW with its state created and a gradient on every weight."""
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    opt.step()
    return opt


def p3b(model: nn.Module, opt: torch.optim.Optimizer, repeats: int) -> dict[str, Any]:
    """One whole magnitude mask update with the sampled threshold vs one fused AdamW step.

    As in training, the pruned weights' gradients are masked before each step (untimed), so
    pruned weights stay zero and each update re-cuts a model that is already sparse.
    """
    settings = PruneSettings("magnitude", target=SPARSITY, threshold="sampled")
    pruner = build_pruner(model, opt, settings)
    exact = build_pruner(model, opt, PruneSettings("magnitude", target=SPARSITY))
    update = _alternate(pruner, opt, repeats)
    check = dict(LAST_TIMING)
    exact_update = _alternate(exact, opt, max(1, repeats // 2))
    return row("P3b mask update / fused AdamW step", update[0] / update[1], "<= 3",
               f"update {update[0] * 1e3:.0f} ms, AdamW step {update[1] * 1e3:.0f} ms (magnitude, sampled "
               f"threshold, one pass per tensor, bit-packed masks); with the exact threshold "
               f"{exact_update[0] / exact_update[1]:.1f}x", check)


def _alternate(pruner: Any, opt: torch.optim.Optimizer, repeats: int) -> tuple[float, float]:
    """Median seconds of (a mask update, a fused AdamW step), alternated, gradients masked in between."""
    updates, steps = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        pruner.prune_to(SPARSITY)
        middle = time.perf_counter()
        pruner.before_step()  # untimed: the trainer's gradient masking, so pruned weights stay zero
        resume = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if i:
            updates.append(middle - start)
            steps.append(end - resume)
    LAST_TIMING.clear()
    LAST_TIMING.update(timing.summary({"mask update": updates, "AdamW step": steps}))
    return statistics.median(updates), statistics.median(steps)


def p4(model: nn.Module, opt: torch.optim.Optimizer, method: str, target: str) -> dict[str, Any]:
    """(weights + AdamW state + pruning buffers) / weights for ``method`` after one mask update."""
    pruner = build_pruner(model, opt, PruneSettings(method, target=SPARSITY, start=0, end=1))
    pruner.set_total_steps(10)
    pruner.before_step()  # movement: accumulate the score once
    pruner.prune_to(SPARSITY)
    weights = tensor_bytes(list(model.parameters()))
    state = tensor_bytes(list(opt.state.values()))
    buffers = pruner.buffer_bytes()
    pruner.close()
    return row(f"P4 {method} (weights + AdamW + buffers) / weights", (weights + state + buffers) / weights, target,
               f"weights {weights / 2**20:.0f} MiB, AdamW state {state / 2**20:.0f} MiB, "
               f"pruning buffers {buffers / 2**20:.1f} MiB")


def adamwprune_rows(n: int, path: Path = PARTS) -> list[dict[str, Any]]:
    """P1, P2, P2s and AdamWPrune's P4 from scripts/bench_parts_adamwprune.py, if that file exists yet."""
    names = PART_NAMES
    if not path.exists():
        print(f"missing: rows P1, P2, P2s, P4 adamwprune ({path.name} does not exist)")
        return [row(f"{name} (missing)", None, "-", f"{path.name} not found") for name in names]
    spec = importlib.util.spec_from_file_location("bench_parts_adamwprune", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = []
    for name in names:
        try:
            part = dict(getattr(module, name)(n))
        except Exception as exc:  # report the failure as a row; the other rows still count
            rows.append(row(f"{name} (failed)", None, "-", f"{type(exc).__name__}: {exc}"))
            continue
        detail = part.get("detail", "")
        if isinstance(detail, dict) and "timing" in detail:  # the part's spread and load, as every row has them
            part["timing"] = detail.pop("timing")
        part["detail"] = (detail if isinstance(detail, str) else json.dumps(detail, default=str)) + timing.mark(
            part.get("timing"))
        part["met"] = part.get("met") or met(part.get("value"), part.get("target"))
        rows.append(part)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'name':52s} {'value':>10s} {'target':>8s}  met"]
    for r in rows:
        value = r.get("value")
        shown = f"{value:10.4g}" if isinstance(value, int | float) else f"{'-':>10s}"
        lines.append(f"{str(r.get('name'))[:52]:52s} {shown} {str(r.get('target')):>8s}  {r.get('met')}")
    return "\n".join(lines)


def run(
    scale: float = 1.0, repeats: int = 5, draws: int = 40, out: Path | None = None, parts: bool = True
) -> dict[str, Any]:
    """Run every row; print the table and write the JSON to ``out``; return the JSON data."""
    model = gpt2_like(scale)
    n = sum(p.numel() for p in model.parameters())
    print(f"bench_pruning: {n / 1e6:.1f}M weights in {len(list(model.parameters()))} tensors, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = p3(model, repeats, draws)
    opt = adamw_with_grads(model)
    rows.append(p3b(model, opt, repeats))
    rows.append(p4(model, opt, "movement", "<= 4.04"))
    rows.append(p4(model, opt, "magnitude", "<= 3.04"))
    rows += adamwprune_rows(n) if parts else [row(f"{name} (skipped)", None, "-", "--no-parts")
                                               for name in PART_NAMES]
    data = {"scale": scale, "weights": n, "threads": torch.get_num_threads(), "repeats": repeats,
            "draws": draws, "peak_rss_bytes": peak(torch.device("cpu"))["peak_rss_bytes"], "rows": rows}
    print(table(rows))
    for r in rows:
        print(f"  {r.get('name')}: {r.get('detail', '')}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of GPT-2 124M's weights (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per figure after warm-up")
    parser.add_argument("--draws", type=int, default=40, help="sampled-threshold draws for the error rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-parts", action="store_true", help=f"skip the rows of {PARTS.name}")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_pruning.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.scale, args.repeats, args.draws, args.out, parts=not args.no_parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
