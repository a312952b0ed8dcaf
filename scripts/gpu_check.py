"""`make gpu-check`: prove every GPU-only path of the harness on this machine's CUDA GPU in one command.

Parts (scripts/gpucheck/, one process each, each with its own budget; 8 minutes in all on one H100):
0 the box; 1 `make hwinfo` and the plan for gpt2-finewebedu-bitter7; 2 GPT-2 124M, AdamWPrune bitter7
at 50 % against AdamW dense (tokens/s, MFU, peak memory against the plan's estimate); 3 the fused
masked AdamW/SPAM steps against torch's fused AdamW, and the sampled threshold against the exact one;
4 2:4 semi-structured kernels against dense, and a sweep 2:4 row; 5 activation-checkpointing bytes per
policy against the estimates; 6 exact resume with deterministic algorithms; 7 the tests marked gpu.

Writes results/gpu_check_<stamp>/gpu_check.json and gpu_check.md (after every part). Exit 0 when every
part is ok or skipped, 1 when one failed or timed out, 2 without a CUDA GPU, 3 for a CPU build of torch
on a machine with a GPU. --dry (make gpu-check DRY=1): every part's set-up on the CPU on tiny shapes.

Usage: python scripts/gpu_check.py [--dry] [--parts box,plan,...] [--results DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))

from gpucheck import BY_KEY, box, runner  # noqa: E402

from lib.core.provenance import code_state  # noqa: E402


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="every part's set-up on the CPU, tiny shapes (CI)")
    parser.add_argument("--parts", default="", help=f"comma-separated parts: {','.join(BY_KEY)}")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where gpu_check_<stamp>/ goes")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # the child process of one part
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--min-free-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def commit() -> str:
    """The commit checked, with "+dirty" for uncommitted changes to tracked files (lib/core/provenance.py)."""
    state = code_state()
    return (state["commit"][:12] + ("+dirty" if state["dirty"] else "")) if state["commit"] else "unknown (no git)"


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.part:
        return runner.child(args.module, args.work, args.budget, args.dry, args.min_free_gib)
    only = [k.strip() for k in args.parts.split(",") if k.strip()]
    unknown = [k for k in only if k not in BY_KEY]
    if unknown:
        print(f"error: PARTS={args.parts!r}: no part named {', '.join(unknown)}; the parts are "
              f"{', '.join(BY_KEY)}", file=sys.stderr)
        return 2
    refused = box.preflight(args.dry)
    if refused:
        print(refused[1], file=sys.stderr)
        return refused[0]
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out = args.results / f"gpu_check{'_dry' if args.dry else ''}_{stamp}"
    info = box.describe()
    header = {"stamp": stamp, "commit": commit(), "box": {k: info[k] for k in ("device", "torch", "cuda", "python")},
              "versions": {k: info.get(k) for k in ("torch", "cuda", "cudnn", "triton", "cusparselt", "driver")}}
    print(f"GPU check{' (DRY=1: set-up on the CPU, tiny shapes)' if args.dry else ''} on {info['device']}, "
          f"torch {info['torch']}; writing {out}/", flush=True)
    record = runner.run_all(out, args.dry, only, header)
    print(runner.markdown(record))
    print(f"{out}/gpu_check.md: {record['status']}")
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
