"""lib/hardware/__init__.py: the plan on made-up devices (no GPU needed), manual mode, and its bad inputs."""

from __future__ import annotations

import dataclasses

import pytest

from lib import config, hardware, matrix
from lib.core.errors import ConfigError, HarnessError
from lib.core.units import GIB
from lib.hardware import Devices, Gpu, HardwareSettings
from lib.hardware.gpus import identify
from tests.conftest import ROOT, resolve_defconfig, tiny_spec

AUTO = HardwareSettings()
CPU = Devices("cpu", cpu_cores=2)


def gpus(name: str, count: int, total_gib: float, free_gib: float | None = None, capability=(9, 0),
         vendor: str = "nvidia", bf16: bool = True, compile_works: bool = True) -> Devices:
    free = total_gib - 0.5 if free_gib is None else free_gib  # an idle GPU: the CUDA context only
    gpu = Gpu(name, int(total_gib * GIB), int(free * GIB), capability, vendor)
    return Devices("cuda", (gpu,) * count, 32, bf16, compile_works)


B200 = gpus("NVIDIA B200", 1, 178.4)
W7900 = gpus("AMD Radeon PRO W7900", 1, 48.0, capability=(11, 0), vendor="amd")
A10G = gpus("NVIDIA A10G", 1, 22.5, capability=(8, 6))
H100X8 = gpus("NVIDIA H100 80GB HBM3", 8, 79.6)
B200X4 = gpus("NVIDIA B200", 4, 178.4)


def gpt2(batch: int = 1024, size: str = "124m", block: int = 1024):
    """The reference GPT-2 run: 124M at block 1024, effective batch 1024 (docs/algorithms.md,
    "GPU micro-batch table")."""
    spec = tiny_spec(batch_size=batch)
    return dataclasses.replace(spec, model="gpt2", model_options={"size": size, "block_size": block,
                                                                   "dataset": "finewebedu", "vocab_size": 50304})


def lenet(batch: int = 512):
    return tiny_spec(batch_size=batch)


def settings(**kw) -> HardwareSettings:
    return dataclasses.replace(AUTO, **kw)


def assert_at_target(plan, target: int) -> None:
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.effective_batch == target
    assert "= target" in plan.rationale


@pytest.mark.parametrize("devices, micro, accum", [(B200, 128, 8), (W7900, 32, 32), (A10G, 8, 128)])
def test_published_single_gpu_gpt2_choices(devices, micro, accum):
    """GPT-2 124M, block 1024, one GPU: B200 -> 128, W7900 -> 32, A10G -> 8 at batch 1024
    (docs/algorithms.md, "GPU micro-batch table")."""
    plan = hardware.plan(gpt2(), AUTO, devices)
    assert (plan.micro_batch, plan.grad_accum, plan.world_size) == (micro, accum, 1)
    assert_at_target(plan, 1024)
    assert "GPU table" in plan.rationale and plan.device == "cuda" and plan.dtype == "bfloat16"


def test_w7900_compiles_off_and_no_tf32_b200_compiles_with_tf32():
    amd, nvidia = hardware.plan(gpt2(), AUTO, W7900), hardware.plan(gpt2(), AUTO, B200)
    assert not amd.compile and "known to break" in amd.rationale and not amd.tf32
    assert nvidia.compile and nvidia.tf32 and "TF32 on" in nvidia.rationale


@pytest.mark.parametrize("devices, world, micro", [(B200X4, 4, 128), (H100X8, 8, 64)])
def test_multi_gpu_keeps_the_effective_batch(devices, world, micro):
    plan = hardware.plan(gpt2(), AUTO, devices)
    assert plan.world_size == world and plan.micro_batch == micro and plan.backend == "nccl"
    assert_at_target(plan, 1024)
    assert "DDP over nccl" in plan.rationale


def test_busy_gpu_is_sized_from_free_memory_not_the_table():
    busy = gpus("NVIDIA B200", 1, 178.4, free_gib=30.0)
    plan = hardware.plan(gpt2(), AUTO, busy)
    assert plan.micro_batch < 128 and "memory rule" in plan.rationale and "30.0 GiB free" in plan.rationale
    assert_at_target(plan, 1024)


def test_mixed_gpus_are_sized_for_the_tightest():
    mixed = Devices("cuda", (Gpu("NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0)),
                             Gpu("NVIDIA A100-SXM4-40GB", 40 * GIB, 39 * GIB, (8, 0))), 32, True, True)
    plan = hardware.plan(gpt2(), AUTO, mixed)
    alone = hardware.plan(gpt2(), AUTO, gpus("NVIDIA A100-SXM4-40GB", 2, 40, 39, (8, 0)))
    assert plan.world_size == 2 and plan.micro_batch <= alone.micro_batch
    assert "mixed GPUs" in plan.rationale
    assert_at_target(plan, 1024)


def test_unknown_gpu_uses_the_memory_rule_and_other_models_too():
    unknown = hardware.plan(gpt2(), AUTO, gpus("NVIDIA RTX 6000 Ada Generation", 1, 47.5, capability=(8, 9)))
    assert "memory rule" in unknown.rationale and "GPU table" not in unknown.rationale
    assert_at_target(unknown, 1024)
    bigger = hardware.plan(gpt2(size="350m"), AUTO, B200)  # the table is for 124M at block 1024 only
    assert "memory rule" in bigger.rationale
    resnet = dataclasses.replace(lenet(512), model="resnet18", model_options={})
    assert_at_target(hardware.plan(resnet, AUTO, A10G), 512)


@pytest.mark.parametrize("choice, compiled", [("on", True), ("off", False), ("auto", True)])
def test_compile_on_off_keeps_the_effective_batch(choice, compiled):
    plan = hardware.plan(gpt2(), settings(compile=choice), B200)
    assert plan.compile is compiled
    assert_at_target(plan, 1024)


def test_compile_auto_off_without_triton_and_on_refused():
    no_triton = gpus("NVIDIA B200", 1, 178.4, compile_works=False)
    assert not hardware.plan(gpt2(), AUTO, no_triton).compile
    with pytest.raises(HarnessError, match="torch.compile cannot run here"):
        hardware.plan(gpt2(), settings(compile="on"), no_triton)


def test_precision_choices():
    old = gpus("Tesla V100-SXM2-16GB", 1, 16, capability=(7, 0), bf16=False)
    plan = hardware.plan(lenet(), AUTO, old)
    assert plan.dtype == "float16" and not plan.tf32 and "grad scaler" in plan.rationale
    cpu = hardware.plan(lenet(), AUTO, CPU)
    assert not cpu.compile and cpu.dtype == "float32" and "fp32 (auto: CPU)" in cpu.rationale
    assert hardware.plan(lenet(), settings(compile="on", dtype="bf16"), CPU).compile
    assert not hardware.plan(gpt2(), settings(tf32=False), B200).tf32
    with pytest.raises(HarnessError, match="CONFIG_DTYPE_FP16 needs a GPU"):
        hardware.plan(lenet(), settings(dtype="fp16"), CPU)


def test_cpu_rule():
    plan = hardware.plan(lenet(1000), AUTO, CPU, jobs=2)
    assert plan.micro_batch * plan.grad_accum == 1000 and plan.micro_batch <= 512
    assert plan.threads == 1 and plan.device == "cpu"  # two runs side by side share the two cores
    gpt = hardware.plan(gpt2(), AUTO, CPU)
    assert (gpt.micro_batch, gpt.grad_accum) == (8, 128)
    assert_at_target(gpt, 1024)


def test_cpu_ranks_use_gloo_and_share_cores():
    plan = hardware.plan(gpt2(), settings(ranks_per_node=2), CPU)
    assert plan.world_size == 2 and plan.backend == "gloo" and plan.threads == 1
    assert_at_target(plan, 1024)


def test_target_not_divisible_is_reported_with_the_difference():
    plan = hardware.plan(lenet(1021), settings(ranks_per_node=2), CPU)  # 1021 is prime
    assert plan.effective_batch == 1020
    assert "NOT the target 1021 (-1, -0.1 %)" in plan.rationale
    prime = hardware.plan(lenet(1021), AUTO, CPU)  # one rank: micro-batch 1 would be absurd
    assert prime.micro_batch > 100 and "NOT the target 1021" in prime.rationale


def test_device_cuda_without_gpu():
    with pytest.raises(HarnessError, match="CONFIG_DEVICE_CUDA"):
        hardware.plan(lenet(), settings(device="cuda"), CPU)
    assert hardware.plan(lenet(), settings(device="cpu"), B200).device == "cpu"


def test_more_ranks_than_devices():
    with pytest.raises(HarnessError, match="more ranks than the 1 GPU"):
        hardware.plan(gpt2(), settings(ranks_per_node=2), B200)
    with pytest.raises(HarnessError, match="more CPU ranks than the 2 core"):
        hardware.plan(gpt2(), settings(ranks_per_node=3), CPU)


def test_batch_smaller_than_world():
    with pytest.raises(HarnessError, match="smaller than the 8 ranks"):
        hardware.plan(lenet(4), AUTO, H100X8)


def test_manual_mode_overrides_auto_and_is_validated():
    plan = hardware.plan(gpt2(), settings(batch_plan="manual", micro_batch=16, grad_accum=64), B200)
    assert (plan.micro_batch, plan.grad_accum) == (16, 64) and "manual" in plan.rationale
    with pytest.raises(ConfigError, match="CONFIG_MICRO_BATCH=0"):
        hardware.plan(gpt2(), settings(batch_plan="manual", micro_batch=0, grad_accum=1), B200)
    with pytest.raises(ConfigError, match="set CONFIG_GRAD_ACCUM=8"):
        hardware.plan(gpt2(), settings(batch_plan="manual", micro_batch=128, grad_accum=4), B200)
    with pytest.raises(ConfigError, match="choose a micro-batch that divides 1024"):
        hardware.plan(gpt2(), settings(batch_plan="manual", micro_batch=48, grad_accum=20), B200)
    with pytest.raises(ConfigError, match="CONFIG_GRAD_ACCUM=0"):
        hardware.plan(gpt2(), settings(batch_plan="manual", micro_batch=8, grad_accum=0), B200)
    with pytest.raises(ConfigError, match="make CONFIG_BATCH_SIZE a multiple of the 4 ranks"):
        hardware.plan(gpt2(1022), settings(batch_plan="manual", micro_batch=8, grad_accum=32), B200X4)
    huge = hardware.plan(gpt2(), settings(batch_plan="manual", micro_batch=1024, grad_accum=1), A10G)
    assert "expect out-of-memory" in huge.rationale


def test_model_that_cannot_fit():
    tiny_gpu = gpus("NVIDIA A10G", 1, 22.5, free_gib=2.0, capability=(8, 6))
    with pytest.raises(HarnessError, match="does not fit on NVIDIA A10G"):
        hardware.plan(gpt2(), AUTO, tiny_gpu)


def test_gpu_names_are_identified():
    assert identify("NVIDIA A100-SXM4-80GB", 80 * GIB).key == "A100-80GB"
    assert identify("NVIDIA A100-SXM4-40GB", 40 * GIB).key == "A100-40GB"
    assert identify("NVIDIA L40S", 48 * GIB).key == "L40S" and identify("NVIDIA L4", 24 * GIB).key == "L4"
    assert identify("AMD Instinct MI300X", 192 * GIB).key == "MI300X"
    assert identify("NVIDIA GH200 480GB", 96 * GIB) is None  # not an H200: the memory rule sizes it


def test_footprint_grows_with_micro_batch_and_model():
    from lib.core.task import get_task
    from lib.hardware import memory

    small = memory.estimate_footprint(get_task("gpt2"), gpt2(), "bfloat16")
    big = memory.estimate_footprint(get_task("gpt2"), gpt2(size="350m"), "bfloat16")
    assert 0 < small.per_sample < big.per_sample and small.fixed < big.fixed
    assert small.at(8) < small.at(16)


def test_hardware_symbols_reach_the_plan(make_config):
    cfg = config.load(make_config("CONFIG_BATCH_PLAN_MANUAL=y\nCONFIG_MICRO_BATCH=32\nCONFIG_GRAD_ACCUM=4\n"
                                  "CONFIG_PROBE_BATCH=y\nCONFIG_RANKS_PER_NODE=1\nCONFIG_GPU_MEMORY_MARGIN=20\n"
                                  "CONFIG_TF32=n\n"))
    hw = cfg.hardware
    assert (hw.batch_plan, hw.micro_batch, hw.grad_accum, hw.probe, hw.memory_margin, hw.tf32) == (
        "manual", 32, 4, True, 0.2, False)
    spec = matrix.expand(cfg, CPU)[0]
    assert (spec.hardware.micro_batch, spec.hardware.grad_accum, spec.hardware.probe) == (32, 4, True)


def test_multinode_symbols(make_config):
    lines = "CONFIG_DIST_MULTINODE=y\nCONFIG_DIST_NNODES=2\nCONFIG_DIST_NODE_RANK=1\n"
    cfg = config.load(make_config(lines + 'CONFIG_DIST_RDZV_ENDPOINT="10.0.0.1:29500"\n'))
    plan = matrix.expand(cfg, CPU)[0].hardware
    assert (plan.nnodes, plan.node_rank, plan.rdzv_endpoint, plan.world_size) == (2, 1, "10.0.0.1:29500", 2)
    with pytest.raises(ConfigError, match="CONFIG_DIST_RDZV_ENDPOINT"):
        config.load(make_config(lines))
    with pytest.raises(ConfigError, match="CONFIG_DIST_NODE_RANK=2 must be below"):
        config.load(make_config(lines.replace("RANK=1", "RANK=2") + 'CONFIG_DIST_RDZV_ENDPOINT="h:1"\n'))
    with pytest.raises(ConfigError, match="CONFIG_DIST_RDZV_ENDPOINT='10.0.0.1'"):  # no port
        config.load(make_config(lines + 'CONFIG_DIST_RDZV_ENDPOINT="10.0.0.1"\n'))
    with pytest.raises(ConfigError, match="CONFIG_DIST_RDZV_ID is empty"):
        config.load(make_config(lines + 'CONFIG_DIST_RDZV_ENDPOINT="h:1"\nCONFIG_DIST_RDZV_ID=""\n'))


def test_manual_batch_zero_in_config_is_one_line(make_config, capsys):
    from lib import cli

    path = make_config("CONFIG_BATCH_PLAN_MANUAL=y\nCONFIG_MICRO_BATCH=0\n")
    with pytest.raises(ConfigError, match="CONFIG_MICRO_BATCH=0: a manual micro batch must be at least 1"):
        matrix.expand(config.load(path), CPU)
    assert cli.main(["dry-run", "--config", str(path)]) == 2  # what `make dry-run` / `make` exit with
    err = capsys.readouterr().err
    assert err.startswith("error: CONFIG_MICRO_BATCH=0") and err.count("\n") == 1


def test_seed_gpt2_defconfigs_plan_on_every_made_up_device(tmp_path):
    for name in ("gpt2-finewebedu-bitter7", "gpt2-finewebedu-bitter8", "gpt2-finewebedu-spam-vs-bitter7"):
        path = resolve_defconfig((ROOT / "defconfigs" / name).read_text(), tmp_path / f"{name}.config")
        cfg = config.load(path)
        for devices in (CPU, A10G, W7900, B200, B200X4, H100X8):
            for spec in matrix.expand(cfg, devices):
                assert_at_target(spec.hardware, spec.train.batch_size)


def test_hwinfo_prints_devices_and_each_plan_with_its_reason(make_config, capsys):
    from lib import cli

    path = make_config((ROOT / "defconfigs" / "lenet5-quick").read_text())
    assert cli.main(["hwinfo", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "detected:" in out and "core(s) usable" in out
    assert "plan for lenet5: cpu 128x1x1=128 fp32" in out and "why: CPU" in out and "CPU rule" in out
    assert "lenet5_adamw_magnitude_90" in out  # every run is listed with its plan
    assert cli.main(["dry-run", "--config", str(path)]) == 0
    assert "plan for lenet5: cpu 128x1x1=128 fp32" in capsys.readouterr().out  # dry-run shows the same


def test_mfu_uses_the_datasheet_peak_and_only_16_bit_known_gpus():
    from gpt2.model import config_for, flops_per_token
    from lib.hardware.gpus import mfu

    per_token = flops_per_token(config_for("124m", 50257, 1024))
    assert per_token == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024  # 6N + 12 L d T
    result = mfu(per_token, 100_000.0, "NVIDIA H100 80GB HBM3", 80 * GIB, "bfloat16", 1)
    assert result["gpu"] == "H100" and result["value"] == pytest.approx(100_000 * per_token / 989e12)
    assert mfu(per_token, 400_000.0, "NVIDIA B200", 180 * GIB, "bfloat16", 4)["peak_flops"] == 4 * 2250e12
    assert mfu(per_token, 1.0, "NVIDIA H100 80GB HBM3", 80 * GIB, "float32", 1) is None  # not vs a 16-bit peak
    assert mfu(per_token, 1.0, "Some Future GPU", 80 * GIB, "bfloat16", 1) is None
    assert mfu(per_token, 1.0, "NVIDIA A10G", 23 * GIB, "bfloat16", 1) is None  # no trusted peak figure
    assert mfu(None, 1.0, "NVIDIA B200", 180 * GIB, "bfloat16", 1) is None  # a task that counts no FLOPs


def test_runs_side_by_side_share_a_gpu():
    alone = hardware.plan(gpt2(), AUTO, B200, jobs=1)
    shared = hardware.plan(gpt2(), AUTO, B200, jobs=2)  # MATRIX_JOBS=2 on one GPU: half the memory each
    assert alone.micro_batch == 128 and shared.micro_batch < 128
    assert "shared by 2 runs side by side" in shared.rationale
    assert_at_target(shared, 1024)
    assert hardware.plan(gpt2(), AUTO, B200X4, jobs=1).micro_batch == 128  # 4 ranks on 4 GPUs: no sharing


def test_detect_reads_the_gpus_from_a_child_process(monkeypatch):
    """No GPU here: torch is told it has one, and the child's report is made up."""
    import torch

    report = {"gpus": [{"name": "NVIDIA A10G", "total": 23 * GIB, "free": 22 * GIB, "capability": [8, 6]}] * 2,
              "vendor": "nvidia", "bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "_query_gpus", lambda: report)
    devices = hardware.detect()
    assert devices.kind == "cuda" and devices.count == 2 and devices.homogeneous and devices.bf16
    assert devices.gpus[0] == Gpu("NVIDIA A10G", 23 * GIB, 22 * GIB, (8, 6), "nvidia")
    assert "GPU 1: NVIDIA A10G (A10G), 22.0 GiB free of 23.0 GiB" in devices.describe()


def test_a_failing_gpu_query_is_one_line(monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nRuntimeError: CUDA driver gone\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(HarnessError, match=r"could not query the GPUs \(RuntimeError: CUDA driver gone\)"):
        hardware._query_gpus()
