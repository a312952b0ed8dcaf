"""ResNet models and task plug-ins: sizes, batches, evaluation, defconfigs, and a short real run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from lib import config
from lib.core.errors import ConfigError, DataMissingError
from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings
from lib.matrix import combinations
from lib.train import run as run_mod
from resnet.data import normalize
from resnet.model import resnet18, resnet50
from resnet.task import RESNET18, RESNET50, ResNetTask
from tests.conftest import ROOT, resolve_defconfig
from tests.resnet.test_resnet_data import write_tiny_cifar


def make_spec(data_dir: Path, model: str = "resnet18", micro_batch: int = 8, val_images: int = 20,
              augment_on: bool = True, **train) -> RunSpec:
    return RunSpec(
        name=f"{model}_test", model=model, seed=1,
        optim=OptimSettings("adamw", 2e-3, 0.01),
        prune=PruneSettings(),
        train=TrainSettings(batch_size=micro_batch, **{"max_iters": 3, **train}),
        hardware=HardwarePlan(device="cpu", micro_batch=micro_batch, grad_accum=1, threads=1),
        model_options={"augment": augment_on, "val_images": val_images},
        data_dir=str(data_dir),
    )


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_tiny_cifar(tmp_path / "cifar10", "cifar10")


# ---------------------------------------------------------------- model


def test_parameter_counts() -> None:
    assert sum(p.numel() for p in resnet18(10).parameters()) == 11_173_962
    assert sum(p.numel() for p in resnet50(100).parameters()) == 23_705_252


def test_forward_shapes_keep_32_pixels_in_the_first_stage() -> None:
    model = resnet18(10).eval()
    sizes = []
    model.layer1.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    model.layer4.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert resnet50(100).eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert sizes == [32, 4]  # 3x3 stride-1 stem and no max-pool


def test_train_batches_cover_each_epoch_and_augment_keeps_the_order(cifar10) -> None:
    root, _ = cifar10
    task = ResNetTask("resnet18", "cifar10", 10)
    plain, augmented = make_spec(root, augment_on=False), make_spec(root)
    n = task.examples_per_epoch(plain)
    assert n == 80
    batches = list(itertools.islice(task.train_batches(plain, 7, seed=3), math.ceil(2 * n / 7)))
    assert all(b[0].shape == (7, 3, 32, 32) and b[0].dtype == torch.float32 for b in batches)
    train = task._data(plain).train
    lookup = {bytes(normalize(img[None], task.layout).numpy()): i for i, img in enumerate(train.images)}
    ids = [lookup[bytes(img[None].numpy())] for b in batches for img in b[0]]
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n : 2 * n]) == list(range(n))
    aug = list(itertools.islice(task.train_batches(augmented, 7, seed=3), len(batches)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(aug, batches, strict=True))  # same images, same order
    assert not torch.equal(aug[0][0], batches[0][0])
    again = next(task.train_batches(augmented, 7, seed=3))
    assert torch.equal(again[0], aug[0][0])
    seeked = list(itertools.islice(task.train_batches(augmented, 7, seed=3, start=15), 3))  # past an epoch's end
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seeked, aug[15:18], strict=True))


def test_evaluate_keeps_mode_and_batchnorm_statistics(cifar10, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = cifar10
    task = ResNetTask("resnet18", "cifar10", 10)
    monkeypatch.setattr(task, "eval_batch", 4)
    spec = make_spec(root)
    torch.manual_seed(0)
    model = task.build_model(spec)
    before = model.bn1.running_mean.clone()
    for training in (True, False):
        model.train(training)
        result = task.evaluate(model, spec, "test")
        assert model.training is training and set(result) == {"loss", "accuracy"}
    assert torch.equal(model.bn1.running_mean, before)  # evaluated in eval mode
    model.eval()
    limited = make_spec(root, eval_batches=1)
    with torch.no_grad():
        logits = model(normalize(task._data(spec).val.images[:4], task.layout))
    expected = 100.0 * (logits.argmax(1) == task._data(spec).val.labels[:4]).float().mean().item()
    assert task.evaluate(model, limited, "val")["accuracy"] == pytest.approx(expected)


def test_task_surface_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (RESNET18.name, RESNET18.dataset, RESNET18.classes) == ("resnet18", "cifar10", 10)
    assert (RESNET50.name, RESNET50.dataset, RESNET50.classes) == ("resnet50", "cifar100", 100)
    assert RESNET18.metric.name == "accuracy" and RESNET18.metric.higher_is_better
    assert RESNET18.sample_unit == "images"
    with pytest.raises(ConfigError, match="val_images"):
        RESNET18.prepare(RunSpec.from_dict({**make_spec(tmp_path).to_dict(), "model_options": {"val_images": "x"}}))
    seen: list[tuple[str, Path]] = []
    monkeypatch.setattr("resnet.task.download_cifar", lambda which, dest: seen.append((which, dest)) or True)
    assert "downloaded" in RESNET50.fetch_data(make_spec(tmp_path, model="resnet50"))
    assert seen == [("cifar100", tmp_path / "cifar100")]


def test_missing_data_names_make_prepare_data(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match=r"make prepare-data") as err:
        ResNetTask("resnet18", "cifar10", 10).prepare(make_spec(tmp_path))
    assert "data_batch_1" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- Kconfig, defconfigs, a real run


def test_model_options_and_defconfigs(tmp_path: Path) -> None:
    shapes = {"resnet18-cifar10-matrix": 14, "resnet18-cifar10-optimizers": 5, "resnet50-cifar100-matrix": 14,
              "resnet50-cifar100-adamw-base": 6}
    for name, runs in shapes.items():
        cfg = config.load(resolve_defconfig((ROOT / "defconfigs" / name).read_text(), tmp_path / name))
        model = cfg.models[0]
        assert cfg.model_options == {model: {"augment": True, "val_images": 5000}}
        assert len(combinations(cfg)) == runs and cfg.train.epochs == 100
        assert cfg.train.batch_size == (512 if model == "resnet18" else 256)


def test_short_resnet18_run_through_lib_run(cifar10, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = cifar10
    monkeypatch.setattr(RESNET18, "eval_batch", 8)
    spec = make_spec(root, max_iters=3, eval_batches=1, log_interval=1, eval_interval=3)
    spec = RunSpec.from_dict({**spec.to_dict(), "name": "resnet18_short",
                              "prune": {**spec.to_dict()["prune"], "method": "magnitude", "target": 0.5,
                                        "start": 1, "end": 2, "frequency": 1}})
    run_dir = root / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    run_mod.run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary.get("error")
    curve = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    assert len(curve) == 3 and all(math.isfinite(c["loss"]) for c in curve)
    assert abs(summary["sparsity"]["reached"] - 0.5) <= 0.005
    assert summary["sparsity"]["total_params"] == 11_173_962
    assert summary["test_at_best"]["accuracy"] in {100.0 * k / 8 for k in range(9)}  # one batch of 8
