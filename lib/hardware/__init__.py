"""Device discovery and the hardware plan: micro-batch, grad-accum, ranks, compile, precision.

``detect()`` is the one place that asks torch about devices; tests replace it
with made-up devices. ``plan()`` turns a run and the hardware settings into a
HardwarePlan whose micro-batch x grad-accum x world size is the effective batch
(exactly, or the plan says by how much it is not), with a one-line rationale.
The micro-batch rules (docs/algorithms.md, "Hardware plan") are in batch.py; every
other choice (ranks, compile, fused step, precision, TF32) is made once here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from lib.core import ROOT
from lib.core.errors import ConfigError, HarnessError
from lib.core.pyenv import pythonpath_with
from lib.core.spec import HardwarePlan, RunSpec
from lib.core.task import get_task
from lib.core.units import gib
from lib.hardware import parallel
from lib.hardware.batch import Room, batch_and_recompute, share_per_rank, shortfall
from lib.hardware.gpus import identify
from lib.hardware.plan_actckpt import ActCkptPlanner


@dataclass(frozen=True)
class Gpu:
    """One visible GPU."""

    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability; (8, 0) is Ampere
    vendor: str = "nvidia"  # or "amd" (ROCm builds of torch also say "cuda")


@dataclass(frozen=True)
class Devices:
    """What the machine offers this process."""

    kind: str  # "cpu" or "cuda"
    gpus: tuple[Gpu, ...] = ()
    cpu_cores: int = 1
    bf16: bool = False  # every GPU computes in bfloat16
    compile_works: bool = True  # torch.compile can run (triton for GPUs, a C++ compiler for the CPU)
    cpu_kernels: str = ""  # why lib/kernels' CPU kernels cannot be built here; empty when they can

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def homogeneous(self) -> bool:
        return len({(g.name, g.total_bytes) for g in self.gpus}) <= 1

    def describe(self) -> str:
        """What was detected, one line per device (make hwinfo)."""
        kernels = "built" if not self.cpu_kernels else f"unavailable: {self.cpu_kernels}"
        compiles = "can" if self.compile_works else "cannot"
        lines = [f"CPU: {self.cpu_cores} core(s) usable; torch.compile {compiles} run; fused masked-step kernels "
                 f"{kernels}"]
        for i, g in enumerate(self.gpus):
            known = identify(g.name, g.total_bytes)
            lines.append(f"GPU {i}: {g.name} ({known.key if known else 'not in the GPU table'}), "
                         f"{gib(g.free_bytes)} free of {gib(g.total_bytes)}, compute capability "
                         f"{g.capability[0]}.{g.capability[1]}, {g.vendor}")
        if self.kind == "cuda":
            lines.append(f"{self.count} GPU(s), {'one type' if self.homogeneous else 'MIXED types'}; "
                         f"bf16 {'yes' if self.bf16 else 'no'}")
        else:
            lines.append("no GPU visible to torch")
        return "\n".join(lines)


def detect() -> Devices:
    """Ask torch what devices this process can use."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    from lib.optim import kernels

    if not torch.cuda.is_available():
        return Devices("cpu", cpu_cores=cores, compile_works=bool(shutil.which("g++") or shutil.which("c++")),
                       cpu_kernels=kernels.why_unavailable("cpu"))
    report = _query_gpus()
    gpus = tuple(Gpu(g["name"], g["total"], g["free"], tuple(g["capability"]), report["vendor"])
                 for g in report["gpus"])
    return Devices("cuda", gpus, cores, report["bf16"], importlib.util.find_spec("triton") is not None)


def made_up(text: str, cpu_cores: int = 1) -> Devices:
    """GPUs that are not here, for a what-if plan: ``COUNTx NAME:TOTAL_GIB[:FREE_GIB]``, e.g. make dry-run
    GPUS="1x NVIDIA A10G:24:8" (an A10G with 8 GiB free); idle (0.5 GiB for the CUDA context) without
    FREE_GIB. Compute capability 8.0, bf16 and torch.compile are assumed."""
    number = r"\s*(\d+(?:\.\d+)?)\s*(?:GiB|GB)?\s*"
    match = re.fullmatch(rf"\s*(?:(\d+)\s*x\s+)?(\S.*?)\s*:{number}(?::{number})?", text)
    total = float(match[3]) if match else 0.0
    free = float(match[4]) if match and match[4] else total - 0.5
    if not match or int(match[1] or 1) < 1 or not 0 < free <= total:
        raise HarnessError(f"GPUS={text!r}: write COUNTx NAME:TOTAL_GIB[:FREE_GIB], e.g. GPUS=\"1x NVIDIA A10G:24\" "
                           f"or \"1x NVIDIA A10G:24:8\" (count >= 1, 0 < free <= total)")
    gpu = Gpu(match[2], int(total * 2**30), int(free * 2**30), (8, 0))
    return Devices("cuda", (gpu,) * int(match[1] or 1), cpu_cores, bf16=True, compile_works=True)


def _query_gpus() -> dict:
    """The GPUs' names, memory and capability, asked in a child process: free-memory queries create a
    CUDA context on every GPU, which would otherwise stay in this (the matrix's) process for the whole
    matrix and take its memory from the runs."""
    child = subprocess.run([sys.executable, "-c", "from lib.hardware import gpu_report; gpu_report()"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": pythonpath_with(ROOT, os.environ)})
    try:
        return json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        why = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"could not query the GPUs ({why}); check `nvidia-smi` / `rocm-smi`, or set "
                           f"CONFIG_DEVICE_CPU") from None


def gpu_report() -> None:
    """Print what torch sees of the GPUs as one JSON line (run by ``_query_gpus`` in a child process)."""
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"name": torch.cuda.get_device_name(i), "total": total, "free": free,
                     "capability": list(torch.cuda.get_device_capability(i))})
    print(json.dumps({"gpus": gpus, "vendor": "amd" if torch.version.hip else "nvidia",
                      "bf16": torch.cuda.is_bf16_supported()}))


@dataclass(frozen=True)
class HardwareSettings:
    """The hardware symbols of .config (lib/hardware/Kconfig); "auto" lets the plan decide."""

    device: str = "auto"  # auto, cpu, cuda
    compile: str = "auto"  # auto, on, off
    fused_step: str = "auto"  # auto, on, off: AdamWPrune's mask inside its update (lib/optim/masked_step.py)
    act_ckpt: str = "none"  # activation checkpointing: none, uniform, sqrt, budget, selective, auto (actckpt.py)
    act_ckpt_every: int = 2
    act_budget_mb: int = 0  # the budget policy's activation memory
    dtype: str = "auto"  # auto, bf16, fp16, fp32
    cpu_threads: int = 0
    batch_plan: str = "auto"  # auto or manual
    micro_batch: int = 0  # manual only
    grad_accum: int = 0  # manual only
    probe: bool = False
    memory_margin: float = 0.10  # fraction of free GPU memory left unused
    ranks_per_node: int = 0  # 0: one per GPU (1 on a CPU)
    tf32: bool = True
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    parallel: str = "auto"  # auto, ddp, fsdp: how several ranks share the model (lib/hardware/parallel.py)


def plan(spec: RunSpec, settings: HardwareSettings, devices: Devices | None = None, jobs: int = 1) -> HardwarePlan:
    """The plan for ``spec`` (its model, model options and effective batch) on ``devices``."""
    devices = devices or detect()
    if settings.device == "cuda" and devices.kind != "cuda":
        raise HarnessError("CONFIG_DEVICE_CUDA is set but torch sees no CUDA GPU; choose DEVICE_AUTO or DEVICE_CPU")
    on_gpu = devices.kind == "cuda" and settings.device != "cpu"
    ranks = _ranks_per_node(settings.ranks_per_node, devices, on_gpu)
    world = ranks * settings.nnodes
    target = spec.train.batch_size
    per_rank = share_per_rank(target, world)
    use_compile, compile_why = _compile_choice(settings.compile, on_gpu, devices)
    fused, fused_why = _fused_choice(settings.fused_step, on_gpu, devices)
    precision, dtype_why = _dtype_choice(settings.dtype, on_gpu, devices.bf16)
    tf32, tf32_why = _tf32_choice(settings.tf32, on_gpu, devices)
    task = get_task(spec.model)
    room = Room.of(devices, settings.memory_margin, jobs * ranks) if on_gpu else None

    def sized(shards: int) -> tuple[ActCkptPlanner, tuple]:
        ckpt = ActCkptPlanner(settings, task, spec, precision, shards)
        return ckpt, batch_and_recompute(spec, settings, task, ckpt, devices, room, world, per_rank)

    sharding, (ckpt, (micro, accum, sizing, recompute)), sharding_why = parallel.choose(
        settings.parallel, spec, task, world, on_gpu, precision, sized)
    if sharding == "fsdp" and settings.probe:
        raise ConfigError("CONFIG_PROBE_BATCH cannot run sharded (FSDP2) yet: an out-of-memory on one rank in the "
                          "middle of a gather would stall the others; turn it off, or choose PARALLEL_DDP")
    if sharding == "fsdp" and fused:
        fused, fused_why = False, "fused masked step off (FSDP2: its kernels take whole tensors, not shards)"
    policy, every = recompute.policy, recompute.every
    segments, ckpt_why = ckpt.segments(policy, every, micro, auto=settings.act_ckpt == "auto")
    if sharding == "fsdp" and any(s.first != s.last for s in segments):
        raise ConfigError(f"activation checkpointing {policy} checkpoints segments of several blocks, which FSDP2's "
                          f"one-unit-per-block sharding cannot run yet; choose ACTIVATION_CKPT_UNIFORM, SELECTIVE or "
                          f"AUTO, or PARALLEL_DDP")
    threads = 0 if on_gpu else settings.cpu_threads or max(1, devices.cpu_cores // max(1, jobs * ranks))
    where = (f"{ranks}x {devices.gpus[0].name if devices.homogeneous else 'mixed GPUs'}" if on_gpu
             else f"CPU, {threads} thread(s) per rank x {ranks} rank(s) x {jobs} run(s) side by side") + \
        (f" per node x {settings.nnodes} nodes" if settings.nnodes > 1 else "")
    batch = f"{micro} x {accum} accum x {world} rank(s) = {micro * accum * world}" + shortfall(micro * accum * world,
                                                                                            target)
    parts = [where, sizing, batch, compile_why, fused_why, dtype_why, tf32_why] + [w for w in (recompute.why, ckpt_why)
                                                                                   if w]
    if settings.probe:
        parts.append("probe on: halve the micro-batch on out-of-memory before training")
    if world > 1:
        parts.append(f"{'FSDP2' if sharding == 'fsdp' else 'DDP'} over {'nccl' if on_gpu else 'gloo'} ({sharding_why})")
    return HardwarePlan(
        device="cuda" if on_gpu else "cpu", micro_batch=micro, grad_accum=accum, world_size=world,
        compile=use_compile, fused_step=fused, act_ckpt=policy, act_ckpt_every=every,
        act_ckpt_segments=tuple((s.first, s.last, s.selective) for s in segments),
        dtype=precision, threads=threads, rationale="; ".join(parts),
        tf32=tf32, probe=settings.probe, backend=("nccl" if on_gpu else "gloo") if world > 1 else "",
        nnodes=settings.nnodes, node_rank=settings.node_rank, rdzv_endpoint=settings.rdzv_endpoint,
        rdzv_id=settings.rdzv_id, parallel=sharding,
    )


def _ranks_per_node(asked: int, devices: Devices, on_gpu: bool) -> int:
    if on_gpu:
        if asked > devices.count:
            raise HarnessError(f"CONFIG_RANKS_PER_NODE={asked} asks for more ranks than the {devices.count} GPU(s) "
                               f"torch sees; set it to 0 (one rank per GPU) or at most {devices.count}")
        return asked or devices.count
    if asked > devices.cpu_cores:
        raise HarnessError(f"CONFIG_RANKS_PER_NODE={asked} asks for more CPU ranks than the {devices.cpu_cores} "
                           f"core(s) here; set it to at most {devices.cpu_cores} (0 = one rank)")
    return asked or 1


def _fused_choice(choice: str, on_gpu: bool, devices: Devices) -> tuple[bool, str]:
    """Whether AdamWPrune's masked step runs fused, and why; FUSED_STEP_ON where it cannot run falls back loudly."""
    if choice == "off":
        return False, "fused masked step off (FUSED_STEP_OFF)"
    if on_gpu:
        broken = [g.name for g in devices.gpus if (m := identify(g.name, g.total_bytes)) and not m.compile_ok]
        why = ("torch.compile cannot run here (no triton)" if not devices.compile_works
               else f"torch.compile is known to break on {broken[0]}" if broken else "")
        kernel = "torch.compile (Triton)"
    else:
        why, kernel = devices.cpu_kernels, "the C kernel"
    if not why:
        return True, f"fused masked step on ({choice}: {kernel})"
    if choice == "on":
        print(f"warning: CONFIG_FUSED_STEP_ON, but {why}; AdamWPrune masks its gradients in a separate pass "
              f"instead (set FUSED_STEP_AUTO to silence this)", file=sys.stderr)
        return False, f"fused masked step off (FUSED_STEP_ON asked for it, but {why}: eager masking instead)"
    return False, f"fused masked step off (auto: {why})"


def _compile_choice(choice: str, on_gpu: bool, devices: Devices) -> tuple[bool, str]:
    if choice == "on" and not devices.compile_works:
        raise HarnessError("CONFIG_COMPILE_ON but torch.compile cannot run here (no triton for the GPU, or no "
                           "C++ compiler for the CPU); choose COMPILE_AUTO or COMPILE_OFF")
    if choice in ("on", "off"):
        return choice == "on", f"compile {choice} (COMPILE_{choice.upper()})"
    if not on_gpu:
        return False, "compile off (auto: on a CPU the first compiled step costs more than a short run gains)"
    broken = [g.name for g in devices.gpus if (m := identify(g.name, g.total_bytes)) and not m.compile_ok]
    if broken:
        return False, f"compile off (auto: known to break on {broken[0]})"
    if not devices.compile_works:
        return False, "compile off (auto: torch.compile cannot run here, no triton)"
    return True, "compile on (auto: NVIDIA GPU)" if all(g.vendor == "nvidia" for g in devices.gpus) else \
        "compile on (auto)"


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype_choice(choice: str, on_gpu: bool, bf16: bool) -> tuple[str, str]:
    if choice != "auto":
        if choice == "fp16" and not on_gpu:
            raise HarnessError("CONFIG_DTYPE_FP16 needs a GPU (fp16 autocast with a gradient scaler); "
                               "choose DTYPE_AUTO, DTYPE_BF16 or DTYPE_FP32 on the CPU")
        return DTYPES[choice], f"{choice} (DTYPE_{choice.upper()})"
    if not on_gpu:
        return "float32", "fp32 (auto: CPU)"
    return ("bfloat16", "bf16 (auto: supported)") if bf16 else ("float16", "fp16 + grad scaler (auto: no bf16)")


def _tf32_choice(allowed: bool, on_gpu: bool, devices: Devices) -> tuple[bool, str]:
    if not on_gpu:
        return False, "TF32 n/a (CPU)"
    capable = all(g.vendor == "nvidia" and g.capability >= (8, 0) for g in devices.gpus)
    if not capable:
        return False, "TF32 off (needs NVIDIA Ampere or newer)"
    return (True, "TF32 on (Ampere or newer)") if allowed else (False, "TF32 off (CONFIG_TF32=n)")
