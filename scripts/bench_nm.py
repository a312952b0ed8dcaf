"""2:4 sparsity measured on GPT-2 124M's linear layers: what the zeros buy on this device.

The four Linear shapes of a GPT-2 124M block (attention c_attn 768 -> 2304, attention c_proj
768 -> 768, MLP c_fc 768 -> 3072, MLP c_proj 3072 -> 768) multiply a batch of TOKENS tokens,
once with a dense weight and once with the same weight pruned 2:4 by magnitude
(lib/pruning/nm.py), side by side in one process, medians of interleaved timings.

- On a CUDA GPU of compute capability 8.0 or newer, in float16: the pruned weight as torch's
  semi-structured sparse tensor (``torch.sparse.to_sparse_semi_structured``, sparse tensor cores)
  against the dense weight; the ratio dense / sparse is the speed-up. Also the outputs' largest
  difference from the masked dense product, which must be float16 rounding only.
- Elsewhere (the CPU): the 2:4-masked weight through the same dense kernel, float32. The ratio is
  what 2:4 zeros buy without sparse kernels; the GPU figures are reported as unmeasured.

Usage: python scripts/bench_nm.py [--repeats 25] [--tokens 8192] [--out results/bench_nm.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.core import timing  # noqa: E402
from lib.pruning.nm import is_exactly_nm, keep_mask  # noqa: E402

SHAPES = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


def _timed(fn, device: torch.device) -> float:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def measure(name: str, shape: tuple[int, int], tokens: int, repeats: int, device: torch.device,
            sparse_kernels: bool, dtype: torch.dtype | None = None) -> dict[str, float | str]:
    """Dense against 2:4 for one layer shape; ``dtype`` defaults to float16 with the sparse kernels
    (scripts/gpu_check.py also asks for bfloat16), float32 without."""
    d_in, d_out = shape
    dtype = dtype or (torch.float16 if sparse_kernels else torch.float32)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen).to(device, dtype)
    masked = weight * keep_mask(weight.abs().float(), 2, 4).to(device)
    assert is_exactly_nm(masked != 0, 2, 4)
    x = torch.randn(tokens, d_in, generator=gen).to(device, dtype)
    if sparse_kernels:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(masked)
        other = lambda: F.linear(x, sparse)  # noqa: E731
        error = float((F.linear(x, sparse) - F.linear(x, masked)).abs().max())
    else:
        other = lambda: F.linear(x, masked)  # noqa: E731
        error = 0.0
    dense = lambda: F.linear(x, weight)  # noqa: E731
    for fn in (dense, other):
        fn()  # warm-up
    times: dict[str, list[float]] = {"dense": [], "2:4": []}
    for _ in range(repeats):
        times["dense"].append(_timed(dense, device))
        times["2:4"].append(_timed(other, device))
    dense_ms, nm_ms = statistics.median(times["dense"]), statistics.median(times["2:4"])
    return {"layer": name, "in": d_in, "out": d_out, "dense_ms": dense_ms, "nm_ms": nm_ms,
            "speedup": dense_ms / nm_ms, "max_abs_error": error, "timing": timing.summary(times, "ms")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the input (batch x sequence)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_nm.json"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sparse_kernels = cuda and torch.cuda.get_device_capability()[0] >= 8
    where = torch.cuda.get_device_name() if cuda else "CPU"
    kind = "float16, semi-structured sparse kernels" if sparse_kernels else "float32, masked weight, dense kernel"
    print(f"2:4 on GPT-2 124M's linear layers, {args.tokens} tokens, {where} ({kind}); medians of {args.repeats}")
    rows = [measure(name, shape, args.tokens, args.repeats, device, sparse_kernels) for name, shape in SHAPES.items()]
    for row in rows:
        print(f"  {row['layer']:<12} {row['in']:>5} -> {row['out']:<5} dense {row['dense_ms']:8.3f} ms   "
              f"2:4 {row['nm_ms']:8.3f} ms   speed-up {row['speedup']:.2f}x{timing.mark(row['timing'])}")
    block = sum(r["dense_ms"] for r in rows) / sum(r["nm_ms"] for r in rows)
    print(f"  all four (one block's linear layers): speed-up {block:.2f}x")
    if not sparse_kernels:
        print("  GPU 2:4 kernels: unmeasured here (needs a CUDA GPU of compute capability 8.0 or newer)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": where, "kind": kind, "tokens": args.tokens,
                                          "sparse_kernels": sparse_kernels, "rows": rows,
                                          "block_speedup": block}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
