"""lib/hardware/parallel.py: DDP or FSDP2 in the plan, its per-rank estimates, and what cannot shard (issue 30)."""

from __future__ import annotations

import dataclasses

import pytest

from lib import hardware
from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings
from lib.core.units import GIB
from lib.hardware import Devices, memory
from lib.hardware.batch import DoesNotFit
from tests.hardware.test_hardware import gpt2, gpus, lenet, settings

A10GX8 = gpus("NVIDIA A10G", 8, 24.0, capability=(8, 6))
A10GX1 = gpus("NVIDIA A10G", 1, 24.0, capability=(8, 6))
CPU2 = Devices("cpu", cpu_cores=2)


def xl(method: str = "magnitude", optimizer: str = "adamw"):
    """GPT-2 1.5B (1558M) at block 1024, effective batch 1024, pruned by ``method`` to 50 %."""
    spec = gpt2(size="1558m")
    return dataclasses.replace(spec, optim=OptimSettings(optimizer, 6e-4, 0.1, base="adamw" if optimizer ==
                                                         "adamwprune" else ""),
                               prune=PruneSettings(method=method, target=0.5))


def test_gpt2_1558m_is_sharded_on_eight_a10g_and_the_rationale_gives_both_estimates() -> None:
    plan = hardware.plan(xl(), settings(), A10GX8)
    assert plan.parallel == "fsdp" and plan.world_size == 8 and plan.effective_batch == 1024
    assert "FSDP2 over nccl (auto: the replicated estimate does not fit" in plan.rationale
    sharded, replicated = (memory.estimate_footprint(hardware.get_task("gpt2"), xl(), "bfloat16", (), n).at(1)
                           for n in (8, 1))
    assert f"{sharded / GIB:.1f} GiB sharded over 8 ranks" in plan.rationale
    assert f"{replicated / GIB:.1f} GiB replicated" in plan.rationale
    usable = 24.0 * 0.9 * GIB - 0.5 * 0.9 * GIB
    assert sharded < usable < replicated  # the reason for the choice, in the estimate's own numbers
    assert not plan.fused_step and "FSDP2: its kernels take whole tensors" in plan.rationale


def test_the_sharded_state_is_a_share_of_the_replicated_plus_the_gathered_units() -> None:
    profiles = memory.activation_profiles(hardware.get_task("gpt2"), xl())
    replicated, two, eight = (memory.state_footprint(profiles, True, n) for n in (1, 2, 8))
    assert len(profiles.block_weights) == 48 and replicated == profiles.weights * 18
    assert profiles.weights * 8 < two < profiles.weights * 8 + GIB  # 16 B/weight halved + the gathered units
    assert eight < two / 3


def test_one_a10g_still_refuses_and_quotes_the_sharded_figure() -> None:
    with pytest.raises(DoesNotFit, match=r"does not fit on NVIDIA A10G: about .* at micro-batch 1 .*; sharded "
                                         r"over 2 ranks \(FSDP2\) about .* per rank .*; sharded it fits on 2 GPUs"):
        hardware.plan(xl(), settings(), A10GX1)


def test_too_few_gpus_even_sharded_names_how_many_would_do() -> None:
    with pytest.raises(DoesNotFit, match=r"even sharded over 2 ranks \(FSDP2\) about .*; sharded it fits on 4 GPUs"):
        hardware.plan(xl(), settings(), gpus("NVIDIA A10G", 2, 16.0, capability=(8, 6)))


def test_ddp_asked_where_only_sharding_fits_is_one_line_naming_the_choice() -> None:
    with pytest.raises(DoesNotFit, match="sharded over 8 ranks .*choose PARALLEL_AUTO or PARALLEL_FSDP"):
        hardware.plan(xl(), settings(parallel="ddp"), A10GX8)


def test_auto_keeps_ddp_where_it_fits_and_on_the_cpu() -> None:
    assert hardware.plan(gpt2(), settings(), A10GX8).parallel == "ddp"
    plan = hardware.plan(lenet(), settings(ranks_per_node=2), CPU2)
    assert plan.parallel == "ddp" and "DDP over gloo (auto: CPU)" in plan.rationale


def test_fsdp_asked_on_the_cpu_shards_over_gloo() -> None:
    spec = gpt2(batch=8, size="tiny", block=16)
    plan = hardware.plan(spec, settings(parallel="fsdp", ranks_per_node=2), CPU2)
    assert plan.parallel == "fsdp" and "FSDP2 over gloo (PARALLEL_FSDP: per rank" in plan.rationale


@pytest.mark.parametrize("spec, devices, asked, words", [
    (xl(), A10GX1, "fsdp", "this run has 1 rank"),
    (lenet(), CPU2, "fsdp", "lenet5 has no blocks to shard"),
    (xl("structured"), A10GX8, "fsdp", "pruning method 'structured' does not run on sharded weights yet"),
    (dataclasses.replace(xl("state", "adamwprune"), optim=OptimSettings("adamwprune", 6e-4, 0.1, base="adamwspam")),
     A10GX8, "fsdp", r"optimizer 'adamwprune' \(base adamwspam\) does not run"),
    (xl("movement"), A10GX8, "fsdp", "pruning method 'movement' does not run"),
    (xl(optimizer="adamwspam"), A10GX8, "fsdp", "optimizer 'adamwspam' does not run"),
    (dataclasses.replace(lenet(), model="resnet18", model_options={"dataset": "cifar10"}), A10GX8, "fsdp",
     "resnet18's BatchNorm running statistics"),
])
def test_what_cannot_shard_is_one_line(spec, devices, asked, words) -> None:
    with pytest.raises(ConfigError, match=words):
        hardware.plan(spec, settings(parallel=asked, ranks_per_node=2 if devices is CPU2 else 0), devices)


def test_auto_where_only_sharding_fits_but_the_method_cannot_shard_says_why() -> None:
    with pytest.raises(DoesNotFit, match="sharding it \\(FSDP2\\) is not possible: pruning method 'movement'"):
        hardware.plan(xl("movement"), settings(), A10GX8)
    assert hardware.plan(xl("state", "adamwprune"), settings(), A10GX8).parallel == "fsdp"  # bitter on AdamW


def test_compact_state_and_surgery_cannot_shard() -> None:
    spec = xl(optimizer="adamwprune")
    compact = dataclasses.replace(spec, optim=dataclasses.replace(spec.optim, compact_state=True))
    with pytest.raises(ConfigError, match="compact optimizer state"):
        hardware.plan(compact, settings(parallel="fsdp"), A10GX8)
    cut = dataclasses.replace(spec, train=dataclasses.replace(spec.train, surgery_every=100))
    with pytest.raises(ConfigError, match="surgery during training"):
        hardware.plan(cut, settings(parallel="fsdp"), A10GX8)


def test_probe_mode_cannot_shard() -> None:
    with pytest.raises(ConfigError, match="CONFIG_PROBE_BATCH cannot run sharded"):
        hardware.plan(xl(), settings(probe=True), A10GX8)


def test_sqrt_checkpointing_cannot_shard_but_uniform_can() -> None:
    with pytest.raises(ConfigError, match="checkpoints segments of several blocks"):
        hardware.plan(xl(), settings(act_ckpt="sqrt"), A10GX8)
    plan = hardware.plan(xl(), settings(act_ckpt="uniform", act_ckpt_every=2), A10GX8)
    assert plan.parallel == "fsdp" and all(first == last for first, last, _ in plan.act_ckpt_segments)
