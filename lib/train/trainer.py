"""The ONE training loop, shared by every model (read it top to bottom).

It knows a model only through its task plug-in (lib/core/task.py) and takes every
setting from the RunSpec; it never reads .config. Outputs in the run folder:
metrics.jsonl (one line per evaluation), the best checkpoint (by validation
metric among evaluations at the target sparsity; lib/checkpoint/folder.py) and
the summary dict that lib/train/run.py writes as summary.json.

With several ranks (torchrun, lib/train/distributed.py) the model runs under
DistributedDataParallel; every rank reads its rows of each global batch, sees
the same reduced losses and metrics (so takes the same decisions), gets rank 0's
pruning masks after each update, and only rank 0 writes anything. Sharded
(FSDP2, lib/train/sharding.py), each rank holds and prunes its shard of every
weight, and all ranks write a training checkpoint's shards together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lib import quant
from lib.checkpoint import state as ckpt_state
from lib.checkpoint.folder import RunCheckpoints
from lib.checkpoint.manager import Manager, Policy, step_file
from lib.core.spec import HardwarePlan, RunSpec, TrainSettings
from lib.core.task import Task, get_task
from lib.hardware import actckpt, memory
from lib.optim import build_optimizer, compact, masked_step
from lib.optim.adamwprune import AdamWPrune
from lib.pruning import build_pruner, per_layer
from lib.surgery.stats import StructureStats
from lib.train import best as best_ckpt
from lib.train import distill, distributed, probe, sharding
from lib.train.distributed import SINGLE, Shard
from lib.train.record import Best, Ended, Trained, summary
from lib.train.tracking import NullTracker, open_tracker

TIME_PROBE_STEPS = 5  # steps measured before a time budget fixes the step count


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:  # strict: an op without a deterministic kernel stops the run (lib/train/run.py sets cuBLAS up)
        torch.use_deterministic_algorithms(True)


def planned_steps(train: TrainSettings, examples_per_epoch: int, batch_size: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) from the EPOCHS and MAX_ITERS budgets."""
    per_epoch = max(1, math.ceil(examples_per_epoch / batch_size))
    budgets = [n for n in (train.epochs * per_epoch, train.max_iters) if n > 0]
    return (min(budgets) if budgets else 0), per_epoch


def lr_at(step: int, peak: float, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``min_ratio * peak`` at ``total``."""
    if warmup and step <= warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(spec: RunSpec, run_dir: Path, shard: Shard = SINGLE, after_surgery: bool = False) -> dict[str, Any]:
    """Train one run as rank ``shard``; return its summary (status ok or diverged). Exceptions mean failed,
    except ``SurgeryDue`` (CONFIG_SURGERY_EVERY): lib/train/run.py cuts the checkpoint just written and calls
    again with ``after_surgery`` (which is not counted as a resume)."""
    hw, cfg = spec.hardware, spec.train
    if hw.threads:
        torch.set_num_threads(hw.threads)
    seed_everything(spec.seed, cfg.deterministic)
    device = distributed.device(hw.device, shard)
    task = get_task(spec.model)
    with distributed.main_first(shard):  # rank 0 alone writes data files a task prepares on first use
        task.prepare(spec)

    checkpoints = RunCheckpoints(run_dir)
    manager = checkpoints.training(Policy(cfg.ckpt_interval, cfg.ckpt_time_s, cfg.ckpt_keep_last, cfg.ckpt_milestone),
                                   say=lambda line: _log(line, shard))
    found = manager.latest()  # a killed or stopped run goes on from its newest valid checkpoint
    architecture = found[1].get("architecture") if found else None  # as surgery left it (lib/surgery/cut.py)
    model = _build_model(task, spec, architecture, device)
    if not found and hasattr(task, "initial_state") and (start := task.initial_state(spec)) is not None:
        model.load_state_dict(start)  # pretrained weights to start from (CONFIG_GPT2_INIT_HF, gpt2/hf.py)
    if hw.parallel == "fsdp":  # before the optimizer and pruner: their state and masks are shards too
        sharding.shard(model, task.blocks(model), hw.dtype)
    stats = StructureStats(model, cfg.structure_stats_every) if cfg.structure_stats_every else None
    optimizer = _build_optimizer(model, spec)
    pruner = build_pruner(model, optimizer, spec.prune)  # the raw model: names match checkpoints
    pruner.layered.calibration = per_layer.calibration(task, spec, model, device)  # OWL reads it, once
    objective = distill.objective(task, distill.teacher_for(task, spec, run_dir, model, device,
                                                            lambda line: _log(line, shard)))  # CONFIG_DISTILL
    if spec.optim.compact_state:  # moments for the kept weights only, once the masks settle
        compact.CompactState(optimizer)
    ddp = distributed.wrap(model, shard, device)  # DistributedDataParallel with several ranks (not sharded)
    forward_model = torch.compile(ddp) if hw.compile else ddp  # compiled forward; same parameters
    autocast, scaler = _precision(device, hw.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = hw.tf32  # the plan: Ampere+ only
    total, per_epoch = planned_steps(cfg, task.examples_per_epoch(spec), cfg.batch_size)
    if found:  # every tensor, counter and RNG as they were; the same micro-batch, not a new probe
        done = ckpt_state.restore(found[1], found[0], spec.to_dict(), model, optimizer, pruner, scaler, stats)
        if sharded := found[1].get("sharded"):  # the weights, optimizer state and masks are in its shards
            sharding.load(found[0], model, optimizer, pruner, sharded["masks"], shard.world_size, sharded["world_size"])
        _log(f"resuming {spec.name} from {found[0].name} (step {done.step})", shard)
        if note := compact.restore_(optimizer, pruner.packed_masks(), _names(pruner), spec.optim.compact_state):
            _log(note, shard)
        done.resumed_from += [] if after_surgery else [done.step]
        hw, probe_tries = dataclasses.replace(hw, micro_batch=done.micro_batch, grad_accum=done.grad_accum), []
    else:  # CONFIG_PROBE_BATCH: halve the micro-batch on out-of-memory, before any real step
        hw, probe_tries = probe.fit_micro_batch(task, model, spec, device, autocast) if hw.probe else (hw, [])
        done = _fresh_progress(cfg, total, per_epoch, hw)
    trained = Trained(model, optimizer, pruner, stats, device, hw)
    provisional, eval_every, step, evals = done.provisional, done.eval_every, done.step, done.evals
    samples, train_time, best = done.samples, done.train_time, Best(done.best_step, dict(done.best_metrics))
    pruner.set_total_steps(provisional)
    stream = _stream_at(task, spec, hw.micro_batch, shard, step * hw.grad_accum)  # past what the run consumed

    tracker = open_tracker(spec, run_dir) if shard.main else NullTracker()  # a tracker failure never stops the run
    if shard.main:
        checkpoints.folder.mkdir(parents=True, exist_ok=True)
    offsets = done.log_offsets if found else {}
    metrics_file = _output(run_dir / "metrics.jsonl", shard, offsets.get("metrics"))
    curve_file = _output(run_dir / "train.jsonl", shard, offsets.get("train"))  # loss, lr, sparsity, memory
    status, error = "ok", None
    memory.reset_peak(device)
    start = time.perf_counter()
    bar = tqdm(total=provisional if total else None, initial=step, desc=spec.name, unit="step", leave=False,
               disable=None if shard.main else True)

    model.train()
    meter_step, activations = step + 2, None  # measured in this session's 2nd step: the 1st allocates caches
    while step < provisional:
        step += 1
        t0 = time.perf_counter()
        lr = lr_at(step, spec.optim.lr, provisional, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(hw.grad_accum):
            batch = tuple(t.to(device, non_blocking=True) for t in next(stream))
            if micro == 0:
                first = batch  # the step's first micro-batch: what structure statistics are measured on
            with distributed.no_sync_unless(ddp, last=micro == hw.grad_accum - 1):  # all-reduce once per step
                before = actckpt.bytes_in_use(device) if step == meter_step and micro == 0 else None
                with autocast():
                    loss = objective(forward_model, batch) / hw.grad_accum
                if before is not None:  # what this forward left saved for backward, under the plan's policy
                    activations = actckpt.bytes_in_use(device) - before
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
            samples += task.samples_in(batch)
        scaler.unscale_(optimizer)  # fp16 only; a no-op otherwise
        if stats is not None and stats.due(step):  # structure statistics for surgery: this step's grads
            with autocast():
                stats.record(functools.partial(task.loss, model, first))
        pruner.before_step()  # pruned weights get no gradient
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if pruner.after_step(step) and not pruner.sharded:  # mask updates happen here, on schedule
            distributed.broadcast_masks(pruner)  # decided once: rank 0's masks on every rank
        if line := compact.compact_when_settled(optimizer, pruner, step):  # CONFIG_COMPACT_STATE
            _log(line, shard)
        train_time += time.perf_counter() - t0
        bar.update(1)

        if cfg.time_budget_s and step == TIME_PROBE_STEPS:  # the slowest rank's time: every rank fixes the same
            provisional = bar.total = _steps_within_budget(step, distributed.reduce_max(train_time),
                                                           cfg.time_budget_s, total)
            pruner.set_total_steps(provisional)
            eval_every = _eval_interval(cfg, per_epoch, provisional)
        log_now = step % cfg.log_interval == 0 or step == provisional
        if log_now or step % eval_every == 0:  # the mean over ranks: every rank takes the same decisions
            train_loss = distributed.reduce_sum(float(loss_sum))[0] / shard.world_size
        if log_now:
            if not math.isfinite(train_loss):
                status, error = "diverged", f"training loss became {train_loss} at step {step}"
                break
            _log_step(curve_file, bar, trained, shard, step=step, of=provisional, loss=train_loss, lr=lr,
                      elapsed=time.perf_counter() - start)
        if step % eval_every == 0 or step == provisional:
            with autocast():  # evaluate in the training precision, as the model is trained in it
                record = _evaluate(task, model, spec, step, per_epoch, lr, pruner, train_loss, start, shard)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            tracker.log(record)
            evals += 1
            if not math.isfinite(record["val"]["loss"]):
                status, error = "diverged", f"validation loss became {record['val']['loss']} at step {step}"
                break
            if best_ckpt.eligible(record, spec) and best_ckpt.improves(task, record, best):
                best = Best(step, record["val"])  # the same on every rank: the metrics are reduced
                best_ckpt.save_best(checkpoints, model, pruner, step, shard)
        stop = _stop_agreed(shard)
        cut_now = cfg.surgery_every > 0 and step % cfg.surgery_every == 0
        if step < provisional and (stop or cut_now or manager.due(step)):  # the end of a step: a clean point to resume
            if pruner.sharded:  # every rank writes its shards first; the rank-0 file that points to them last
                sharding.save(manager.folder / step_file(step), model, optimizer, pruner)
            if shard.main:
                _save_training(manager, spec, trained, scaler, (metrics_file, curve_file), dataclasses.replace(
                    done, step=step, provisional=provisional, eval_every=eval_every, evals=evals, samples=samples,
                    train_time=train_time, wall_before=done.wall_before + time.perf_counter() - start,
                    best_step=best.step, best_metrics=dict(best.metrics)))
            if stop or cut_now:
                bar.close()
                raise ckpt_state.Stopped(step, stop) if stop else ckpt_state.SurgeryDue(step)
    bar.close()
    metrics_file.close()
    curve_file.close()
    tracker.finish()
    wall = done.wall_before + time.perf_counter() - start
    if status == "ok" and shard.main:
        manager.remove_training()  # only a resume needs them; the best and the milestones stay

    reached = pruner.sparsity()  # of the final weights, before the best checkpoint is loaded back
    with autocast():
        test = best_ckpt.test_at_best(task, model, spec, checkpoints, best, shard) if status == "ok" else None
    if not cfg.keep_checkpoints and shard.main:
        checkpoints.drop_best()
    ended = Ended(status, error, best, test, reached, provisional, step, evals, samples, train_time, wall)
    return summary(spec, task, trained, ended, done, probe_tries, activations, shard)


def _build_model(task: Task, spec: RunSpec, architecture: dict | None, device: torch.device) -> torch.nn.Module:
    """The task's model (as surgery left it, if it did), with CONFIG_QUANT_AWARE's fake-quantized Linear layers
    (lib/quant) and the plan's activation checkpointing applied."""
    model = task.build_model(spec, architecture).to(device)
    if spec.train.quant_aware:  # same parameters and state_dict names: masks, checkpoints and exports unchanged
        quant.check_quant_aware(device, _precision(device, spec.hardware.dtype)[0])
        quant.prepare_quant_aware(model)
    if spec.hardware.act_ckpt_segments:  # recompute activations in backward (lib/hardware/actckpt.py)
        actckpt.apply(task.blocks(model), [actckpt.Segment(*s) for s in spec.hardware.act_ckpt_segments])
    return model


def _stream_at(task: Task, spec: RunSpec, micro_batch: int, shard: Shard, consumed: int) -> Iterator[Any]:
    """This rank's training stream from micro-batch ``consumed`` on: seeked by the task, which reads no batch
    before it; replayed (every batch before it drawn and dropped) for a task that cannot seek, saying so."""
    if "start" in inspect.signature(task.train_batches).parameters:
        return task.train_batches(spec, micro_batch, spec.seed, shard=shard, start=consumed)
    stream = task.train_batches(spec, micro_batch, spec.seed, shard=shard)
    if consumed:
        _log(f"resume: {spec.model}'s data stream cannot seek (its train_batches takes no start); replaying "
             f"{consumed:,} micro-batches to reach the checkpoint's place", shard)
    for _ in range(consumed):
        next(stream)
    return stream


def _build_optimizer(model: torch.nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    """The configured optimizer; AdamWPrune takes the plan's fused masked step (clipping reads the gradients
    before the step, so they are masked first)."""
    optimizer = build_optimizer(model, spec.optim)
    if isinstance(optimizer, AdamWPrune):
        optimizer.fused = spec.hardware.fused_step and masked_step.fusable(optimizer)
        optimizer.grads_read_before_step = spec.train.grad_clip > 0
    return optimizer


def _names(pruner: Any) -> dict[torch.Tensor, str]:
    return {param: name for name, param in pruner.params}


def _eval_interval(cfg: TrainSettings, per_epoch: int, planned: int) -> int:
    return cfg.eval_interval or (per_epoch if cfg.epochs else max(1, planned // 10))


def _fresh_progress(cfg: TrainSettings, total: int, per_epoch: int, hw: HardwarePlan) -> ckpt_state.Progress:
    """The counters of a run that starts at step 0 (with only a time budget the step count is fixed after
    TIME_PROBE_STEPS)."""
    provisional = total or 10**9
    return ckpt_state.Progress(provisional=provisional, eval_every=_eval_interval(cfg, per_epoch, provisional),
                               micro_batch=hw.micro_batch, grad_accum=hw.grad_accum)


def _log_step(curve_file: Any, bar: tqdm, trained: Trained, shard: Shard, *, step: int, of: int,
              loss: float, lr: float, elapsed: float) -> None:
    """One line of train.jsonl (flushed: `tail -f` and a watcher see each step), the bar and the log."""
    sparsity = trained.pruner.sparsity()
    curve_file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "sparsity": sparsity, "elapsed_s": elapsed,
                                 **memory.current(trained.device)}) + "\n")
    curve_file.flush()
    bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{sparsity:.3f}")
    _log(f"step {step}/{of} loss {loss:.4f} lr {lr:.2e} sparsity {sparsity:.4f}", shard)


def _save_training(manager: Manager, spec: RunSpec, trained: Trained, scaler: Any, logs: tuple[Any, Any],
                   now: ckpt_state.Progress) -> None:
    """A training checkpoint at the end of ``now.step``, with the logs' sizes there (a resume cuts them back)."""
    metrics_file, curve_file = logs
    metrics_file.flush()
    curve_file.flush()
    now = dataclasses.replace(now, log_offsets={"metrics": metrics_file.tell(), "train": curve_file.tell()})
    manager.save(now.step, ckpt_state.payload(now, spec.to_dict(), trained.model, trained.optimizer,
                                              trained.pruner, scaler, trained.stats, spec.hardware.world_size))


def _output(path: Path, shard: Shard, resume_at: int | None = None) -> Any:
    """A log file of the run folder, opened by rank 0 only; the other ranks write to nowhere.

    On a resume the file is cut back to its size at the checkpoint (``resume_at`` bytes), so the
    steps run again after it are logged once."""
    if not shard.main:
        return open(os.devnull, "w")
    if resume_at is None or not path.exists():
        return path.open("w")
    handle = path.open("r+")
    handle.truncate(resume_at)
    handle.seek(resume_at)
    return handle


def _stop_agreed(shard: Shard) -> int:
    """The stop signal if any rank got one (so that every rank stops after the same step), else 0."""
    stop = ckpt_state.stop_requested()
    if shard.world_size > 1:
        stop = int(distributed.reduce_max(float(stop)))
    return stop


def _precision(device: torch.device, dtype: str) -> tuple[Any, torch.amp.GradScaler]:
    """An autocast context factory for the plan's dtype, and a grad scaler (active for fp16 only)."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    if dtype == "float32":
        return contextlib.nullcontext, scaler
    return (lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))), scaler


def _steps_within_budget(step: int, elapsed: float, budget: float, cap: int) -> int:
    """Steps reachable in the time budget, from the measured speed; never more than ``cap``."""
    reachable = max(step, int(budget / (elapsed / step)))
    return min(reachable, cap) if cap else reachable


def _log(line: str, shard: Shard) -> None:
    if shard.main:
        tqdm.write(line)


def _evaluate(task: Task, model: torch.nn.Module, spec: RunSpec, step: int, per_epoch: int, lr: float,
              pruner: Any, train_loss: float, start: float, shard: Shard) -> dict[str, Any]:
    model.eval()
    with torch.no_grad(), sharding.whole(model):  # sharded: every block gathered, so ranks may differ in forwards
        val = task.evaluate(model, spec, "val", shard=shard)  # each rank its share; the sums reduced
    model.train()
    name = task.metric.name
    _log(f"eval step {step}: val {name} {val[name]:.4f} val loss {val['loss']:.4f} sparsity {pruner.sparsity():.4f}",
         shard)
    return {"step": step, "epoch": step / per_epoch, "lr": lr, "train_loss": train_loss, "val": val,
            "sparsity": pruner.sparsity(), "target_sparsity_now": pruner.scheduled_sparsity(step),
            "masks_final": pruner.masks_final(),
            "elapsed_s": time.perf_counter() - start}
