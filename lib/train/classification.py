"""What every image-classification task shares: in-memory splits and batched evaluation.

Model folders (lenet5/, resnet/) hold their own data formats and transforms;
the split containers and the evaluation loop live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lib.core.errors import ConfigError
from lib.core.provenance import tensors_sha256
from lib.core.task import Metric
from lib.train import distributed
from lib.train.distributed import SINGLE, Shard


@dataclass(frozen=True)
class Split:
    """One split held in memory: images (N, C, H, W) and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SplitData:
    """The train, val and test splits of one dataset."""

    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


def fingerprint(data: SplitData, source: str) -> dict[str, str]:
    """The data a run used, for its provenance: each split's SHA-256 over its images and labels (so the split
    indices and the pixels alike), and where it came from."""
    return {"source": source, **{f"{name}_sha256": tensors_sha256(data.split(name).images, data.split(name).labels)
                                 for name in ("train", "val", "test")}}


def global_batches(count: int, micro_batch: int, seed: int, shard: Shard = SINGLE,
                   start: int = 0) -> Iterator[torch.Tensor]:
    """Endless indices of global batches (micro x world) cut from back-to-back epoch permutations of ``count``,
    from global batch ``start`` on: the epochs before it cost one permutation each, no batch is cut.

    Nothing is dropped: an epoch's leftover indices open the next batch, so every
    ``count`` consecutive samples are exactly one pass over the data, and every batch
    has the same shape (no recompiles, even grad-accumulation weights). Every rank
    draws the same global batches; each takes ``shard.rows(micro_batch)`` of them.
    """
    if micro_batch < 1:
        raise ConfigError(f"micro batch must be at least 1, got {micro_batch}")
    gen = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.int64)
    size = micro_batch * shard.world_size
    epochs, offset = divmod(start * size, count)
    for _ in range(epochs):  # the generator's draws of the epochs already consumed
        torch.randperm(count, generator=gen)
    if offset:
        pending = torch.randperm(count, generator=gen)[offset:]
    while True:
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(count, generator=gen)])
        index, pending = pending[:size], pending[size:]
        yield index


def evaluate(model: nn.Module, data: Split, batch: int, max_batches: int = 0,
             to_input: Callable[[torch.Tensor, torch.device], torch.Tensor] | None = None,
             shard: Shard = SINGLE) -> dict[str, float]:
    """Mean cross-entropy and accuracy (%) over the first ``max_batches`` batches (0 = all), in eval mode.

    The split's order is fixed, so every run evaluates the same images. ``to_input``
    turns stored images into model input on the model's device (e.g. normalise uint8
    there, a quarter of the transfer). The model's train/eval mode is restored.
    With several ranks each takes every world-th batch and the sums are reduced.
    """
    count = min(len(data), max_batches * batch) if max_batches else len(data)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in shard.chunks(count, batch):
                end = min(start + batch, count)
                raw = data.images[start:end].to(param.device)
                images = (to_input(raw, param.device) if to_input else raw).to(param.dtype)
                labels = data.labels[start:end].to(param.device)
                logits = model(images)
                total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                correct += (logits.argmax(dim=1) == labels).sum().item()
    finally:
        model.train(was_training)
    total_loss, correct = distributed.reduce_sum(total_loss, correct)
    return {"loss": total_loss / count, "accuracy": 100.0 * int(correct) / count}


class ClassificationTask:
    """The parts of the task plug-in every image classifier shares: metric, loss, sample counting, sizing."""

    metric = Metric("accuracy", higher_is_better=True, unit="%")
    sample_unit = "images"
    image_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W) the model takes
    cpu_batch_cap = 64  # the largest useful CPU micro-batch (measured on a 2-core CPU VM)

    def cpu_micro_batch(self, spec: object) -> int:
        return self.cpu_batch_cap

    def gpu_micro_batch(self, spec: object, gpu: str) -> int | None:
        return None  # no published table: sized from free memory

    def flops_per_sample(self, spec: object) -> float | None:
        return None  # image tasks do not count their FLOPs, so their runs report no MFU

    def example_batch(self, spec: object, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return torch.zeros(n, *self.image_shape, device=device), torch.zeros(n, dtype=torch.int64, device=device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def logits(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return model(images), labels

    def samples_in(self, batch: tuple[torch.Tensor, ...]) -> int:
        return len(batch[0])
