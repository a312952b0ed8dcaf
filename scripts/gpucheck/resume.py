"""Part 6: exact resume on the device. A tiny GPT (AdamWPrune bitter7, its fused masked step, state
pruning to 50 %) runs once uninterrupted and once killed (SIGKILL, two steps after a checkpoint) and
resumed; with CONFIG_DETERMINISTIC (strict deterministic algorithms, CUBLAS_WORKSPACE_CONFIG set by
lib/train/run.py before CUDA starts) the two must be the same run to the bit: every milestone's weights,
optimizer state, masks and RNG states (CUDA's included), the best checkpoint, the logs and the summary.
The model runs uncompiled (three processes compiling it would not fit the budget; part 2 proves
compile); the fused masked step is still compiled, with autotuning off in all three processes, so no
kernel choice depends on timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from gpucheck import ROOT, Context, result
from lib.matrix.records import failure_line

EVERY, DRY_EVERY = 20, 2  # checkpoint (and milestone) interval; the run is three of them
NO_AUTOTUNE = """
import torch._inductor.config as inductor
inductor.max_autotune = False
inductor.coordinate_descent_tuning = False
inductor.triton.autotune_pointwise = False
"""
KILL_AT = """
import os, signal
from lib.checkpoint.manager import Manager
_due = Manager.due
def due(self, step):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _due(self, step)
Manager.due = due
"""


def run(ctx: Context) -> dict:
    from gpucheck.train import ON_CPU, specs
    from lib.checkpoint.compare import run_differences

    every = DRY_EVERY if ctx.dry else EVERY
    extra = {"CONFIG_MAX_ITERS": str(3 * every), "CONFIG_CKPT_INTERVAL": str(every),
             "CONFIG_CKPT_MILESTONE": str(every), "CONFIG_EVAL_INTERVAL": str(every), "CONFIG_LOG_INTERVAL": "1",
             "CONFIG_PRUNING_START": '"2"', "CONFIG_PRUNING_END": f'"{2 * every}"', "CONFIG_DETERMINISTIC": "y",
             "CONFIG_COMPILE_OFF": "y"}  # three processes would each compile the model: part 2 proves compile
    spec = [s for s in specs(ctx.work, True, ROOT / "data", {**extra, **(ON_CPU if ctx.dry else {})})
            if s.pruning == "state"][0]
    reference, resumed = ctx.work / "reference", ctx.work / "resumed"
    for folder in (reference, resumed):
        folder.mkdir(parents=True, exist_ok=True)
        spec.write(folder / "spec.json")
    timeout = ctx.budget_s / 3
    quiet = "" if ctx.dry else NO_AUTOTUNE  # nothing compiles on the CPU; importing inductor costs seconds
    first = _run(reference, quiet, timeout, ctx.dry)
    if first.returncode:
        return result("failed", f"the uninterrupted run failed: {failure_line(reference / 'log.txt')}")
    killed = _run(resumed, quiet + KILL_AT.format(step=every + 2), timeout, ctx.dry)
    if killed.returncode != -signal.SIGKILL or (resumed / "summary.json").exists():
        return result("failed", f"the run was not killed at step {every + 2} (exit {killed.returncode})")
    again = _run(resumed, quiet, timeout, ctx.dry)
    if again.returncode:
        return result("failed", f"the resumed run failed: {failure_line(resumed / 'log.txt')}")
    differences = run_differences(reference, resumed)
    rng = _cuda_rng_round_trip() if ctx.device == "cuda" else "n/a on the CPU"
    found = {"run": spec.name, "steps": 3 * every, "killed_at": every + 2, "resumed_from": every,
             "device": spec.hardware.device, "compile": spec.hardware.compile, "fused_step": spec.hardware.fused_step,
             "dtype": spec.hardware.dtype, "differences": differences, "cuda_rng_round_trip": rng}
    rows = [["run", f"{spec.name} on {spec.hardware.device}, {spec.hardware.dtype}, compile "
                    f"{'on' if spec.hardware.compile else 'off'}, fused step {spec.hardware.fused_step}"],
            ["killed / resumed", f"SIGKILL at step {every + 2}, resumed from step {every}, {3 * every} steps"],
            ["bit-identical", "yes" if not differences else f"NO: {', '.join(differences)}"],
            ["CUDA RNG save/restore", rng]]
    if differences or rng not in ("equal", "n/a on the CPU"):
        return result("failed", f"resume is not exact: {', '.join(differences) or rng}", found, rows)
    return result("ok", "", found, rows)


def _run(run_dir: Path, patch: str, timeout: float, dry: bool) -> subprocess.CompletedProcess:
    """`python -m lib.train.run run_dir` after ``patch``; DRY=1 runs an unpatched one in this process (a new process
    costs seconds of imports on a 2-core CI machine), the killed one always in its own."""
    code = f"{patch}\nimport sys\nfrom lib.train.run import main\nsys.exit(main([{str(run_dir)!r}]))"
    with (run_dir / "log.txt").open("a") as log:
        if dry and not patch:
            from lib.train import run as run_mod

            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                return subprocess.CompletedProcess([], run_mod.main([str(run_dir)]))
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})


def _cuda_rng_round_trip() -> str:
    """The checkpoint's RNG capture and restore (lib/checkpoint/state.py) on CUDA: the same draws again."""
    import torch

    from lib.checkpoint.state import rng_state, set_rng_state

    torch.cuda.manual_seed_all(1234)
    saved = rng_state()
    first = torch.rand(1000, device="cuda")
    set_rng_state(saved)
    second = torch.rand(1000, device="cuda")
    if "cuda" not in saved:
        return "the RNG capture has no CUDA state"
    return "equal" if torch.equal(first, second) else "different draws after restore"
