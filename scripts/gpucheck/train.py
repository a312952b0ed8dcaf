"""Part 2: GPT-2 124M, AdamWPrune bitter7 at 50 % and AdamW dense side by side on offline text.

Both runs come from the gpt2-finewebedu-bitter7 defconfig (a temporary config: pydoc text
instead of FineWebEdu, a few hundred steps, one micro-batch per step) and are planned for this
device by the harness itself, then trained by `python -m lib.train.run` as `make` would. Measured:
steady tokens/s (from train.jsonl, past the compile warm-up and before the first evaluation),
MFU against the GPU table's bf16 peak, and peak CUDA memory against the plan's estimate.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from gpucheck import ROOT, Context, result
from gpucheck.plan import DEFCONFIG, temp_config
from lib.core.units import gib
from lib.train import distributed

STEPS, DRY_STEPS = 150, 6
COMMON = {"CONFIG_GPT2_DATASET_PYDOC": "y", "CONFIG_TIME_BUDGET": '"0"', "CONFIG_LOG_INTERVAL": "5",
          "CONFIG_WARMUP_STEPS": "15", "CONFIG_EVAL_INTERVAL": "75", "CONFIG_EVAL_BATCHES": "4",
          "CONFIG_MAX_ITERS": str(STEPS), "CONFIG_BATCH_SIZE": "32", "CONFIG_PRUNING_START": '"30"',
          "CONFIG_PRUNING_END": '"110"', "CONFIG_PRUNING_FREQUENCY": "10", "CONFIG_CKPT_INTERVAL": "0"}
TINY = {"CONFIG_GPT2_SIZE_TINY": "y", "CONFIG_GPT2_BLOCK_SIZE": "32", "CONFIG_BATCH_SIZE": "4",
       "CONFIG_MAX_ITERS": str(DRY_STEPS), "CONFIG_LOG_INTERVAL": "1", "CONFIG_WARMUP_STEPS": "1",
       "CONFIG_EVAL_INTERVAL": "3", "CONFIG_EVAL_BATCHES": "2", "CONFIG_PRUNING_START": '"1"',
       "CONFIG_PRUNING_END": '"3"', "CONFIG_PRUNING_FREQUENCY": "1"}
DENSE = {"CONFIG_OPTIMIZER_ADAMW": "y", "CONFIG_PRUNING_NONE": "y"}
DENSE_DROPS = ("CONFIG_OPTIMIZER_ADAMWPRUNE", "CONFIG_ADAMWPRUNE_LR", "CONFIG_ADAMWPRUNE_WEIGHT_DECAY",
               "CONFIG_ADAMWPRUNE_BASE_ADAMWSPAM", "CONFIG_PRUNING_STATE")


ON_CPU = {"CONFIG_DEVICE_CPU": "y"}  # DRY=1 stays on the CPU, also on a machine with a GPU


def specs(work: Path, tiny: bool, data_dir: Path, extra: dict[str, str] | None = None) -> list[Any]:
    """The bitter7 run at 50 % and the dense AdamW run, each with the harness's plan for this device
    (``tiny``: a tiny GPT for seconds; ``extra``: more symbols to set, ON_CPU for DRY=1)."""
    from lib import config as config_mod
    from lib import matrix

    changes = {**COMMON, **(TINY if tiny else {}), **(extra or {}), "CONFIG_DATA_DIR": f'"{data_dir}"'}
    found = []
    for name, variant, drop in (("bitter7", {}, ()), ("dense", DENSE, DENSE_DROPS)):
        path = temp_config(work / f"config_{name}", DEFCONFIG, {**changes, **variant}, drop)
        found += matrix.expand(config_mod.load(path))
    return found


def estimate_bytes(spec: Any, work: Path) -> int:
    """The plan's step estimate at the run's micro-batch (weights, gradients, state, activations)."""
    from lib import config as config_mod
    from lib.core.task import get_task
    from lib.hardware.plan_actckpt import ActCkptPlanner

    hw = spec.hardware
    settings = config_mod.load(work / "config_bitter7" / ".config").hardware
    planner = ActCkptPlanner(settings, get_task(spec.model), spec, hw.dtype)
    return planner.footprint(hw.act_ckpt, hw.act_ckpt_every).at(hw.micro_batch)


def steady_rate(run_dir: Path, tokens_per_step: int, first_eval: int) -> tuple[float | None, str]:
    """Tokens/s between the first logged step past 10 % of the run and the last one before the first
    evaluation: compile warm-up and evaluation excluded."""
    log = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    total = max(e["step"] for e in log)
    window = [e for e in log if max(1, total // 10) <= e["step"] <= first_eval]
    if len(window) < 2:
        return None, "too few logged steps"
    a, b = window[0], window[-1]
    seconds = b["elapsed_s"] - a["elapsed_s"]
    return ((b["step"] - a["step"]) * tokens_per_step / seconds if seconds > 0 else None,
            f"steps {a['step']}-{b['step']}")


def train_one(spec: Any, work: Path, timeout: float, dry: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train ``spec`` as `make` would (`python -m lib.train.run`); DRY=1 trains in this process instead, which saves
    the seconds a new process spends importing torch on a 2-core CI machine."""
    run_dir = work / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.write(run_dir / "spec.json")
    with (run_dir / "log.txt").open("w") as log:
        if dry:
            from lib.train import run as run_mod

            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                run_mod.run(run_dir)
        else:
            subprocess.run(distributed.single_process_command(run_dir), cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def run(ctx: Context) -> dict:
    from lib.core.task import get_task
    from lib.hardware import gpus

    deadline = time.monotonic() + ctx.budget_s - 5
    found = specs(ctx.work, ctx.dry, ROOT / "data", ON_CPU if ctx.dry else None)
    results, rows = {}, []
    for spec in found:
        try:
            run_dir, summary = train_one(spec, ctx.work, deadline - time.monotonic(), ctx.dry)
        except subprocess.TimeoutExpired:  # keep what the runs before it measured
            return result("failed", f"{spec.name} did not finish within the part's budget", results, rows)
        if summary["status"] != "ok":
            return result("failed", f"{spec.name}: {summary['status']} ({summary.get('error')})", results, rows)
        hw, opts = spec.hardware, spec.model_options
        tokens = hw.effective_batch * int(opts.get("block_size", 1024))
        rate, window = steady_rate(run_dir, tokens, spec.train.eval_interval)
        task = get_task(spec.model)
        peak = summary["memory"].get("cuda_max_allocated_bytes")
        estimate = estimate_bytes(spec, ctx.work)
        mfu = None
        if rate and peak is not None:
            import torch

            props = torch.cuda.get_device_properties(0)
            mfu = gpus.mfu(task.flops_per_sample(spec), rate, props.name, props.total_memory, hw.dtype, 1)
        results[spec.name] = {
            "plan": hw.rationale, "micro_batch": hw.micro_batch, "grad_accum": hw.grad_accum, "dtype": hw.dtype,
            "compile": hw.compile, "fused_step": hw.fused_step, "steps": summary["steps"]["done"],
            "tokens_per_s_steady": rate, "steady_window": window,
            "tokens_per_s_whole_run": summary["throughput"]["value"], "mfu_steady": mfu["value"] if mfu else None,
            "mfu_peak_source": mfu["peak_source"] if mfu else None, "peak_cuda_allocated_bytes": peak,
            "plan_estimate_bytes": estimate, "peak_over_estimate": peak / estimate if peak else None,
            "sparsity_reached": summary["sparsity"]["reached"], "val_perplexity": summary["best"]["val"]
            .get("perplexity") if summary.get("best") else None, "wall_s": summary["wall_time_s"]}
        r = results[spec.name]
        rows.append([spec.name, f"{_n(rate)} tok/s steady ({window}); MFU {_pct(r['mfu_steady'])}; peak "
                                f"{_gib(peak)} vs plan {_gib(estimate)} ({_ratio(r['peak_over_estimate'])}); "
                                f"sparsity {r['sparsity_reached']:.3f}; {hw.micro_batch} x {hw.grad_accum}, "
                                f"{hw.dtype}, compile {'on' if hw.compile else 'off'}; {r['wall_s']:.0f} s"])
    names = list(results)
    if len(names) == 2 and all(results[n]["tokens_per_s_steady"] for n in names):
        speed = results[names[0]]["tokens_per_s_steady"] / results[names[1]]["tokens_per_s_steady"]
        results["bitter7_over_dense_speed"] = speed
        rows.append(["bitter7 / dense tokens/s", f"{speed:.3f}"])
    return result("ok", "", results, rows)


def _n(x: float | None) -> str:
    return f"{x:,.0f}" if x else "n/a"


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f} %" if x is not None else "n/a (CPU)"


def _gib(x: float | None) -> str:
    return gib(x, 2) if x is not None else "n/a"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "n/a on the CPU"
