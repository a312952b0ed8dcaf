"""The GPU branches the CPU suite cannot reach (marker ``gpu``; `make gpu-check` part 7 runs them on a GPU).

Without CUDA each test skips, saying so. ``pytest --gpu-on-cpu -m gpu`` runs their logic on the CPU
(CUDA-only checks still skip): how these tests were checked for failing on broken code where no GPU was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings
from lib.hardware import memory
from lib.optim.kernels import torch_kernels
from tests.conftest import synthetic_spec, tiny_spec, trained_run

pytestmark = pytest.mark.gpu
PEAK_OVER_ESTIMATE = (0.3, 1.0)  # the plan sizes eager fp32 attention: it may over-estimate 3x, never under


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.config.getoption("--gpu-on-cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False here); `make gpu-check` runs these on one")
    return torch.device("cuda")


def cuda_only(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"{what}: CUDA only")


def bf16_capable(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        pytest.skip(f"bf16 needs compute capability 8.0 or newer; this GPU has {cap}")


@pytest.mark.parametrize("name", ["adamw", "spam"])
def test_the_compiled_masked_step_equals_the_eager_reference(device: torch.device, name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 8 * 4096 + 8 * 123  # whole bit-planes of an odd size: the dynamic-shape graph
    p, g, m, v = (torch.randn(n, generator=gen) for _ in range(4))
    v = v.abs()
    packed = torch.randint(0, 256, (n // 8,), generator=gen, dtype=torch.uint8)
    scalars = (1 - 6e-5, 0.9, 0.95, 1e-3, 0.03, 1e-8) if name == "adamw" else (5000.0, 0.9, 0.999, -1e-3, 1e-8,
                                                                               1 - 1e-5)
    extra = [] if name == "adamw" else [torch.tensor(True, device=device)]
    args = [torch.tensor(x, device=device) for x in scalars]
    eager = [t.clone().to(device) for t in (p, g, m, v)]
    compiled = [t.clone().to(device) for t in (p, g, m, v)]
    torch_kernels.KERNELS[name](*eager, packed.to(device), *extra, *args)
    torch_kernels.compiled(name)(*compiled, packed.to(device), *extra, *args)
    keep = torch_kernels._keep(packed.to(device)).reshape(-1)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-9)
    for written in (compiled[0], compiled[2], compiled[3]):  # weight and moments: pruned entries exactly +0.0
        assert torch.equal(written[~keep], torch.zeros_like(written[~keep]))
    assert not torch.equal(eager[0], p.to(device))  # the step did something


def test_the_exact_threshold_on_the_device_runs_in_strict_deterministic_mode(device: torch.device) -> None:
    from lib.pruning.threshold import exact_value

    gen = torch.Generator().manual_seed(3)
    scores = [torch.randn(n, generator=gen).abs() for n in (1000, 4096, 77)]
    want = float(torch.cat(scores).sort().values[round(0.5 * 5173) - 1])
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert exact_value([s.to(device) for s in scores], 0.5) == want
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_adamwprune_fused_on_the_device_equals_its_eager_path(device: torch.device) -> None:
    from lib.optim.adamwprune import build

    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 16)).to(device)
        opt = build(model, OptimSettings("adamwprune", 1e-2, 0.1))
        masks = {q: (torch.rand(q.shape, device=device) > 0.5) for q in model.parameters() if q.dim() == 2}
        for step in range(4):
            torch.manual_seed(step)
            model(torch.randn(32, 64, device=device)).square().mean().backward()
            if step == 1:
                opt.set_masks(masks)
            opt.fused = fused
            if not fused:
                opt.mask_gradients()
            opt.step()
            opt.zero_grad(set_to_none=False)
        assert all(torch.equal(q[~k], torch.zeros_like(q[~k])) for q, k in masks.items())
        weights.append([q.detach().clone() for q in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_training_steps_learn_and_keep_pruned_weights_zero(device: torch.device, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bf16_capable(device)
    from lib.core.task import get_task

    task, seen = get_task("gpt2"), []
    plain_loss = task.loss

    def loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:  # the precision each training forward ran in
        seen.append((torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)))
        return plain_loss(model, batch)

    monkeypatch.setattr(task, "loss", loss)
    spec = synthetic_spec(tmp_path, max_iters=40)
    spec = dataclasses.replace(
        spec, optim=OptimSettings("adamwprune", 3e-3, 0.0),
        prune=PruneSettings(method="state", target=0.5, start=5, end=20, frequency=5, variant="bitter7"),
        hardware=HardwarePlan(device=device.type, micro_batch=8, grad_accum=2, dtype="bfloat16", fused_step=True,
                              tf32=device.type == "cuda"))
    run_dir = trained_run(tmp_path, spec)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["val"]["perplexity"] < 0.8 * evals[0]["val"]["perplexity"], evals
    assert abs(summary["sparsity"]["reached"] - 0.5) < 0.005
    assert len(seen) >= 40 and set(seen) == {(True, torch.bfloat16)}
    if device.type == "cuda":
        assert summary["memory"]["cuda_max_allocated_bytes"] > 0


def test_the_plans_memory_estimate_covers_the_measured_peak(device: torch.device) -> None:
    cuda_only(device, "peak CUDA memory")
    bf16_capable(device)
    from lib.core.task import get_task

    micro = 4
    spec = dataclasses.replace(tiny_spec("m"), model="gpt2",
                               model_options={"size": "124m", "block_size": 1024, "dataset": "pydoc"})
    task = get_task("gpt2")
    estimate = memory.estimate_footprint(task, spec, "bfloat16").at(micro) - memory.WORKSPACE_BYTES
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model = task.build_model(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = task.example_batch(spec, micro, device)
    for _ in range(2):  # the second step holds the optimizer state through its forward
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - before
    ratio = measured / estimate
    low, high = PEAK_OVER_ESTIMATE
    assert low <= ratio <= high, f"measured {measured / 2**30:.2f} GiB vs estimate {estimate / 2**30:.2f} GiB"


CHILD = "import os, torch; print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count(), " \
        "torch.cuda.get_device_name(0))"


def test_each_run_gets_its_own_cuda_visible_devices(device: torch.device, tmp_path: Path) -> None:
    cuda_only(device, "CUDA_VISIBLE_DEVICES slots")
    from lib.matrix.executors.local import GpuSlots, LocalExecutor

    slots = GpuSlots.here()
    assert slots.total == torch.cuda.device_count() >= 1
    taken = slots.take(1)
    assert taken is not None and slots.take(slots.total) is None  # one is in use: not all are free
    seen = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, "CUDA_VISIBLE_DEVICES": taken[0]},
                          capture_output=True, text=True, timeout=120, check=True).stdout.split(maxsplit=2)
    assert seen[:2] == [taken[0], "1"] and seen[2].strip() == torch.cuda.get_device_name(int(taken[0]))
    folder = tmp_path / "matrix"
    for name in ("a", "b"):  # two single-GPU runs: they share the GPUs there are, one run per slot
        spec = dataclasses.replace(tiny_spec(name), hardware=HardwarePlan(device="cuda", micro_batch=32,
                                                                          grad_accum=2))
        (folder / name).mkdir(parents=True)
        spec.write(folder / name / "spec.json")
    LocalExecutor().run(folder, ["a", "b"], jobs=2, record=False)
    for name in ("a", "b"):
        assert json.loads((folder / name / "summary.json").read_text())["status"] == "ok"
