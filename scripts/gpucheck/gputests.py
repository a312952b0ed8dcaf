"""Part 7: the tests marked gpu (tests/hardware/test_gpu.py), the GPU branches the CPU suite cannot reach: the
compiled masked step against the eager reference, bf16 autocast training steps, the plan's memory
estimate against the measured peak, per-run CUDA_VISIBLE_DEVICES slots. Without CUDA they skip, saying why."""

from __future__ import annotations

import re
import subprocess
import sys

from gpucheck import ROOT, Context, result


def run(ctx: Context) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                           "tests/hardware/test_gpu.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=max(5.0, ctx.budget_s - 5))
    (ctx.work / "pytest.txt").write_text(done.stdout + done.stderr)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", done.stdout)}
    closing = (done.stdout.strip().splitlines() or ["no output"])[-1]
    skipped = [line.split(" ", 2)[-1] for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    rows = [["pytest -m gpu", closing]] + [["skipped", why] for why in skipped[:8]]
    if done.returncode:
        return result("failed", f"pytest exit {done.returncode}: {closing}", {"counts": counts}, rows)
    if ctx.dry and (counts.get("passed", 0) or not skipped):  # without CUDA every one skips, saying why
        return result("failed", f"without CUDA the gpu tests must all skip with a reason: {closing}",
                      {"counts": counts}, rows)
    if not ctx.dry and counts.get("passed", 0) == 0:
        return result("failed", f"no gpu test ran on the GPU: {closing}", {"counts": counts}, rows)
    return result("ok", "", {"counts": counts, "skipped": skipped}, rows)
