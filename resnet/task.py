"""The ResNet task plug-ins: ResNet-18 on CIFAR-10 and ResNet-50 on CIFAR-100.

Model options (from resnet/Kconfig, via lib/config/__init__.py): ``augment`` (bool, random
crop + flip of training images) and ``val_images`` (int, training images held out
for validation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.core.spec import RunSpec
from lib.core.task import Batch
from lib.train import classification
from lib.train.distributed import SINGLE, Shard
from resnet.data import VAL_IMAGES, CifarData, augment, augment_draws, layout_of, load_cifar, normalize
from resnet.download import download_cifar
from resnet.model import resnet18, resnet50

BUILDERS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50}
# Offset between the shuffling and the augmentation generators: turning augmentation
# on or off then leaves the order of the training images unchanged.
AUGMENT_SEED_OFFSET = 7919


class ResNetTask(classification.ClassificationTask):
    """A CIFAR ResNet; the dataset is loaded once per (data_dir, val_images) and kept in memory."""

    eval_batch = 500  # images per evaluation batch; EVAL_BATCHES counts these

    def __init__(self, name: str, dataset: str, classes: int, cpu_batch_cap: int = 64) -> None:
        if name not in BUILDERS:
            raise ValueError(f"unknown ResNet {name!r}; expected one of {', '.join(BUILDERS)}")
        if layout_of(dataset).classes != classes:
            raise ValueError(f"{dataset} has {layout_of(dataset).classes} classes, not {classes}")
        self.name, self.dataset, self.classes = name, dataset, classes
        self.cpu_batch_cap = cpu_batch_cap  # the largest useful CPU micro-batch (measured on a 2-core CPU VM)
        self.layout = layout_of(dataset)
        self._cache: dict[tuple[str, int], CifarData] = {}

    def _options(self, spec: RunSpec) -> tuple[bool, int]:
        """(augment, val_images) from the spec's model options; ConfigError if mistyped."""
        options = spec.model_options
        augment_on, val_images = options.get("augment", True), options.get("val_images", VAL_IMAGES)
        if not isinstance(augment_on, bool):
            raise ConfigError(f"ResNet option augment must be true or false, got {augment_on!r}")
        if type(val_images) is not int:
            raise ConfigError(f"ResNet option val_images must be a whole number, got {val_images!r}")
        return augment_on, val_images

    def _data(self, spec: RunSpec) -> CifarData:
        val_images = self._options(spec)[1]
        key = (str(Path(spec.data_dir).resolve()), val_images)
        if key not in self._cache:
            self._cache[key] = load_cifar(Path(spec.data_dir) / self.dataset, self.dataset, val_images)
        return self._cache[key]

    def prepare(self, spec: RunSpec) -> None:
        self._data(spec)

    def data_fingerprint(self, spec: RunSpec) -> dict[str, str]:
        return classification.fingerprint(self._data(spec), self.dataset)

    def usage(self, spec: RunSpec) -> dict[str, str]:
        """What running an export outside the harness needs (resnet/data.py normalize, resnet/model.py)."""
        return {"input": f"3 x 32 x 32 float32: RGB scaled to [0, 1], minus the channel means {self.layout.mean}, "
                         f"over the channel stds {self.layout.std} (no padding at test time; training crops from "
                         f"a 4-pixel zero padding and flips)",
                "forward": "3x3 conv stem (no max-pool) -> batch norm -> ReLU, four stages of residual blocks "
                           "(ReLU after each addition), global average pool (a mean over H and W), Linear head "
                           f"over {self.classes} classes; batch norm in eval mode"}

    def fetch_data(self, spec: RunSpec) -> str:
        """Download the dataset (for `make prepare-data`); returns a line saying what was done."""
        dest = Path(spec.data_dir) / self.dataset
        fetched = download_cifar(self.dataset, dest)
        return f"{self.dataset} {'downloaded to' if fetched else 'already present in'} {dest}"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every residual block of the four stages, in order, for activation checkpointing."""
        return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]

    def build_model(self, spec: RunSpec, architecture: dict | None = None) -> nn.Module:
        return BUILDERS[self.name](self.classes, architecture)

    def examples_per_epoch(self, spec: RunSpec) -> int:
        return len(self._data(spec).train)

    def train_batches(self, spec: RunSpec, micro_batch: int, seed: int, shard: Shard = SINGLE,
                      start: int = 0) -> Iterator[Batch]:
        """Endless equal-sized batches of this rank's rows (classification.global_batches: every
        ``examples_per_epoch`` consecutive samples are one pass), augmented per batch, from batch ``start``
        on (the skipped batches' augmentation numbers are drawn, their images never read).

        With several ranks every rank augments the whole global batch of micro x world
        (uint8, cheap next to a training step) and keeps its rows: each image gets the
        same crop and flip as in a single-process run, whatever the number of ranks.
        """
        augment_on = self._options(spec)[0]
        train = self._data(spec).train
        augment_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
        rows = shard.rows(micro_batch)
        for _ in range(start if augment_on else 0):
            augment_draws(micro_batch * shard.world_size, augment_gen)
        for index in classification.global_batches(len(train), micro_batch, seed, shard, start):
            images = train.images[index]
            if augment_on:
                images = augment(images, augment_gen)
            yield normalize(images[rows], self.layout), train.labels[index[rows]]

    def evaluate(self, model: nn.Module, spec: RunSpec, split: str, shard: Shard = SINGLE) -> dict[str, float]:
        """Mean cross-entropy and accuracy (%) on "val" or "test", in eval mode (BatchNorm running
        statistics); the model's train/eval mode is restored afterwards."""
        if split not in ("val", "test"):
            raise ValueError(f"evaluate: split must be 'val' or 'test', got {split!r}")
        # uint8 crosses to the device (4x less traffic) and is normalised there
        return classification.evaluate(model, self._data(spec).split(split), self.eval_batch, spec.train.eval_batches,
                                       lambda images, _device: normalize(images, self.layout), shard=shard)


RESNET18 = ResNetTask("resnet18", dataset="cifar10", classes=10, cpu_batch_cap=64)
RESNET50 = ResNetTask("resnet50", dataset="cifar100", classes=100, cpu_batch_cap=32)
