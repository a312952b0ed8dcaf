"""LeNet-5 family: model size, mnist5k split, IDX reader, downloader, task plug-in, Kconfig."""

from __future__ import annotations

import gzip
import io
import itertools
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from lenet5.data import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    MnistData,
    Split,
    download_mnist,
    load_mnist,
    load_mnist5k,
    read_idx,
    stratified_split,
    write_idx,
)
from lenet5.model import LeNet5
from lenet5.task import TASK, LeNet5Task
from lib.core.errors import ConfigError, DataMissingError, HarnessError
from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings
from tests.conftest import ROOT

REPO = ROOT
PAD_VALUE = (0.0 - MNIST_MEAN) / MNIST_STD


def make_spec(dataset: str = "mnist5k", data_dir: Path | str = "data", micro_batch: int = 128) -> RunSpec:
    return RunSpec(
        name="lenet5_test",
        model="lenet5",
        seed=0,
        optim=OptimSettings(name="adamw", lr=3e-3, weight_decay=0.01),
        prune=PruneSettings(),
        train=TrainSettings(batch_size=micro_batch, epochs=2),
        hardware=HardwarePlan(device="cpu", micro_batch=micro_batch, grad_accum=1),
        model_options={"dataset": dataset},
        data_dir=str(data_dir),
    )


def raw_pixels(split: Split) -> np.ndarray:
    """Undo normalisation and padding: the original uint8 28x28 images."""
    raw = (split.images[:, 0, 2:30, 2:30] * MNIST_STD + MNIST_MEAN) * 255
    return raw.round().to(torch.uint8).numpy()


def write_tiny_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    """Four IDX files; train image i is filled with value i and test image j with 200 + j."""
    root.mkdir(parents=True, exist_ok=True)
    train = np.arange(n_train, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    test = (200 + np.arange(n_test, dtype=np.uint8))[:, None, None] * np.ones((1, 28, 28), np.uint8)
    write_idx(root / MNIST_FILES["train_images"], train)
    write_idx(root / MNIST_FILES["train_labels"], (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(root / MNIST_FILES["test_images"], test)
    write_idx(root / MNIST_FILES["test_labels"], (np.arange(n_test) % 10).astype(np.uint8))


@pytest.fixture(scope="module")
def mnist5k() -> MnistData:
    return load_mnist5k()


# ---------------------------------------------------------------- model


def test_parameter_count() -> None:
    assert sum(p.numel() for p in LeNet5().parameters()) == 61_706


def test_forward_shape() -> None:
    assert LeNet5()(torch.zeros(3, 1, 32, 32)).shape == (3, 10)


# ---------------------------------------------------------------- mnist5k


def test_mnist5k_sizes_and_stratified(mnist5k: MnistData) -> None:
    for split, per_class in ((mnist5k.train, 400), (mnist5k.val, 50), (mnist5k.test, 50)):
        assert split.images.shape == (per_class * 10, 1, 32, 32)
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert torch.bincount(split.labels, minlength=10).tolist() == [per_class] * 10


def test_mnist5k_deterministic_and_disjoint(mnist5k: MnistData) -> None:
    again = load_mnist5k()
    for name in ("train", "val", "test"):
        assert torch.equal(mnist5k.split(name).images, again.split(name).images)
        assert torch.equal(mnist5k.split(name).labels, again.split(name).labels)
    digests = [{im.tobytes() for im in raw_pixels(s)} for s in (mnist5k.train, mnist5k.val, mnist5k.test)]
    assert [len(d) for d in digests] == [4000, 500, 500]
    assert not (digests[0] & digests[1] or digests[0] & digests[2] or digests[1] & digests[2])


def test_stratified_split_partitions_indices() -> None:
    labels = np.repeat(np.arange(10), 500)
    train, val, test = stratified_split(labels)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(5000))
    assert (len(train), len(val), len(test)) == (4000, 500, 500)
    assert not np.array_equal(val, stratified_split(labels, seed=1)[1])


def test_mnist5k_normalised_and_padded(mnist5k: MnistData) -> None:
    images = mnist5k.train.images
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.allclose(images[:, 0][:, border], torch.tensor(PAD_VALUE))
    assert images.min().item() == pytest.approx(PAD_VALUE, abs=1e-5)
    assert images.max().item() == pytest.approx((1.0 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    inner = images[:, :, 2:30, 2:30]  # the real digits: about zero mean, unit std
    assert abs(inner.mean().item()) < 0.05 and abs(inner.std().item() - 1.0) < 0.05


def test_mnist5k_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="make venv") as err:
        load_mnist5k(tmp_path / "mnist_5k.csv.gz")
    assert "make prepare-data" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["a.idx.gz", "a.idx"])
@pytest.mark.parametrize(
    "array", [np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), np.array([-5, 70000, 3], dtype=np.int32)]
)
def test_idx_round_trip(tmp_path: Path, name: str, array: np.ndarray) -> None:
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.shape == array.shape and np.array_equal(back, array)


def test_load_mnist_holds_out_validation(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    data = load_mnist(tmp_path, val_count=5)
    assert (len(data.train), len(data.val), len(data.test)) == (25, 5, 10)
    train_ids = raw_pixels(data.train)[:, 0, 0].tolist()
    val_ids = raw_pixels(data.val)[:, 0, 0].tolist()
    assert sorted(train_ids + val_ids) == list(range(30))
    assert raw_pixels(data.test)[:, 0, 0].tolist() == list(range(200, 210))
    assert data.train.labels.tolist() == [i % 10 for i in train_ids]
    assert data.train.images.shape == (25, 1, 32, 32)
    assert torch.equal(load_mnist(tmp_path, val_count=5).val.images, data.val.images)
    other = load_mnist(tmp_path, val_count=5, split_seed=7)
    assert raw_pixels(other.val)[:, 0, 0].tolist() != val_ids


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-9])


def _truncate_inside_gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-9]))


def _bad_magic(path: Path) -> None:
    path.write_bytes(gzip.compress(b"<html>not found</html>"))


@pytest.mark.parametrize("damage", [_truncate, _truncate_inside_gzip, _bad_magic])
def test_corrupt_idx_is_one_line_error(tmp_path: Path, damage) -> None:
    write_tiny_mnist(tmp_path)
    path = tmp_path / MNIST_FILES["train_images"]
    damage(path)
    for load in (lambda: read_idx(path), lambda: load_mnist(tmp_path, val_count=5)):
        with pytest.raises(HarnessError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and path.name in message and "make prepare-data" in message


def test_missing_mnist_files(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="make prepare-data"):
        load_mnist(tmp_path / "mnist")
    with pytest.raises(DataMissingError, match="make prepare-data"):
        LeNet5Task().prepare(make_spec("mnist", data_dir=tmp_path))


def test_too_large_holdout(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    with pytest.raises(HarnessError, match="hold out"):
        load_mnist(tmp_path)  # the default 5000 is more than 30 images


# ---------------------------------------------------------------- downloader


class FakeOpener:
    """Serves bytes per URL like urlopen; unknown URLs fail like an unreachable host."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float = 0) -> io.BytesIO:
        self.calls.append(url)
        if url not in self.files:
            raise urllib.error.URLError(f"cannot reach {url}")
        return io.BytesIO(self.files[url])


def served(source: Path, base: str) -> dict[str, bytes]:
    return {base + name: (source / name).read_bytes() for name in MNIST_FILES.values()}


def test_download_then_skip(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path / "src")
    opener = FakeOpener(served(tmp_path / "src", "https://a.example/mnist/"))
    dest = tmp_path / "data" / "mnist"
    fetched = download_mnist(dest, ["https://a.example/mnist/"], opener=opener)
    assert sorted(p.name for p in fetched) == sorted(MNIST_FILES.values())
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES.values())  # no .part left
    assert len(load_mnist(dest, val_count=5).train) == 25
    assert download_mnist(dest, ["https://a.example/mnist/"], opener=opener) == []
    assert len(opener.calls) == 4
    _truncate(dest / MNIST_FILES["test_labels"])  # a corrupt file is fetched again
    refetched = download_mnist(dest, ["https://a.example/mnist"], opener=opener)
    assert refetched == [dest / MNIST_FILES["test_labels"]]


def test_download_falls_back_to_second_mirror(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path / "src")
    files = served(tmp_path / "src", "https://b.example/")
    files["https://a.example/" + MNIST_FILES["train_images"]] = b"<html>503</html>"  # served but invalid
    opener = FakeOpener(files)
    download_mnist(tmp_path / "out", ["https://a.example/", "https://b.example/"], opener=opener)
    assert len(load_mnist(tmp_path / "out", val_count=5).test) == 10
    assert sum(url.startswith("https://a.example/") for url in opener.calls) == 4


def test_download_from_file_urls(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path / "src")
    missing = (tmp_path / "nowhere").as_uri() + "/"
    download_mnist(tmp_path / "out", [missing, (tmp_path / "src").as_uri() + "/"])
    assert len(load_mnist(tmp_path / "out", val_count=5).val) == 5


def test_download_fails_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(HarnessError) as err:
        download_mnist(tmp_path, ["https://a.example/", "https://b.example/"], opener=FakeOpener({}))
    message = str(err.value)
    assert "\n" not in message and "network" in message
    assert "https://b.example/train-images-idx3-ubyte.gz" in message
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- task plug-in


def test_task_surface() -> None:
    assert (TASK.name, TASK.metric.name, TASK.metric.higher_is_better, TASK.sample_unit) == (
        "lenet5",
        "accuracy",
        True,
        "images",
    )
    with pytest.raises(ConfigError, match="mnist5k"):
        TASK.prepare(make_spec("cifar"))


def test_train_batches_cover_each_epoch(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path / "mnist")
    task, spec = LeNet5Task(mnist_val_count=5), make_spec("mnist", data_dir=tmp_path)
    task.prepare(spec)
    n = task.examples_per_epoch(spec)
    assert n == 25
    batches = list(itertools.islice(task.train_batches(spec, 7, seed=3), math.ceil(3 * n / 7)))
    assert all(task.samples_in(b) == 7 and b[0].shape == (7, 1, 32, 32) for b in batches)
    ids = np.concatenate([raw_pixels(Split(*b))[:, 0, 0] for b in batches])
    epochs = [ids[i * n : (i + 1) * n].tolist() for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == n for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = next(task.train_batches(spec, 7, seed=3))
    assert torch.equal(again[0], batches[0][0])
    assert not torch.equal(next(task.train_batches(spec, 7, seed=4))[0], batches[0][0])


def test_evaluate_keeps_mode_and_casts(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path / "mnist")
    task, spec = LeNet5Task(mnist_val_count=5), make_spec("mnist", data_dir=tmp_path)
    model = task.build_model(spec)
    grad_modes: list[bool] = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    for training in (True, False):
        model.train(training)
        result = task.evaluate(model, spec, "test")
        assert model.training is training
        assert set(result) == {"loss", "accuracy"} and 0.0 <= result["accuracy"] <= 100.0
    assert task.evaluate(model.double(), spec, "val")["loss"] > 0
    assert grad_modes and not any(grad_modes)  # ran under no_grad


def test_fetch_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "venv" in TASK.fetch_data(make_spec("mnist5k"))
    seen: list[Path] = []
    monkeypatch.setattr("lenet5.task.download_mnist", lambda dest: seen.append(dest) or [])
    TASK.fetch_data(make_spec("mnist", data_dir=tmp_path))
    assert seen == [tmp_path / "mnist"]


def test_short_training_reaches_85_percent() -> None:
    torch.manual_seed(0)
    spec = make_spec("mnist5k")
    TASK.prepare(spec)
    model = TASK.build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = math.ceil(2 * TASK.examples_per_epoch(spec) / 128)
    for batch in itertools.islice(TASK.train_batches(spec, 128, seed=0), steps):
        loss = TASK.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert TASK.evaluate(model, spec, "val")["accuracy"] > 85.0


# ---------------------------------------------------------------- Kconfig


def test_kconfig_parses_with_help_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kconfiglib = pytest.importorskip("kconfiglib")
    top = tmp_path / "Kconfig"
    source = 'if MODEL_LENET5_SELECTED\nsource "lenet5/Kconfig"\nendif\n'
    top.write_text("config MODEL_LENET5_SELECTED\n\tdef_bool y\n\n" + source)
    monkeypatch.setenv("srctree", str(REPO))
    kconf = kconfiglib.Kconfig(str(top), warn_to_stderr=False)
    assert kconf.warnings == []
    choice = next(c for c in kconf.named_choices.values() if c.name == "LENET5_DATASET")
    assert choice.nodes[0].prompt[0] == "LeNet-5 dataset"
    members = {s.name for s in choice.syms}
    assert members == {"LENET5_DATASET_MNIST5K", "LENET5_DATASET_MNIST"}
    assert all(node.help for node in choice.nodes) and all(s.nodes[0].help for s in choice.syms)
    # lib/config/__init__.py's rule: selected member minus "<choice>_", lowercased
    assert choice.selection.name.removeprefix(choice.name + "_").lower() == "mnist5k"
    kconf.syms["LENET5_DATASET_MNIST"].set_value(2)
    assert choice.selection.name.removeprefix(choice.name + "_").lower() == "mnist"



def test_eval_batches_limits_the_evaluated_images(monkeypatch):
    import lenet5.task as task_mod

    monkeypatch.setattr(task_mod, "EVAL_BATCH", 100)
    spec = make_spec()
    limited = RunSpec.from_dict({**spec.to_dict(), "train": {**spec.to_dict()["train"], "eval_batches": 2}})
    torch.manual_seed(0)
    model = TASK.build_model(spec)
    full, part = TASK.evaluate(model, spec, "val"), TASK.evaluate(model, limited, "val")
    data = TASK._data(spec).val
    with torch.no_grad():  # the first 2 x 100 images, by hand
        logits = model(data.images[:200])
    expected = 100.0 * (logits.argmax(1) == data.labels[:200]).float().mean().item()
    assert part["accuracy"] == pytest.approx(expected) and full != part
