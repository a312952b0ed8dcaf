"""The task plug-in: the only surface through which lib/ knows a model family.

Each model folder (lenet5/, gpt2/, resnet/) exposes ``TASK``, an object
with the members of ``Task`` below. The trainer, the matrix, the reports and the
graphs know nothing else about a model. ``TASKS`` maps a model name to the module
holding its task; it is imported only when that model is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from lib.core.registry import lookup

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lib.core.spec import RunSpec

Batch = tuple["torch.Tensor", ...]


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes results, checkpoints and tracking."""
        return self.rank == 0

    def rows(self, micro_batch: int) -> slice:
        """This rank's rows of a global batch of ``micro_batch * world_size`` rows."""
        return slice(self.rank * micro_batch, (self.rank + 1) * micro_batch)

    def chunks(self, total: int, size: int) -> range:
        """Starts of the evaluation chunks (of ``size`` items out of ``total``) this rank takes: every world-th."""
        return range(self.rank * size, total, size * self.world_size)


SINGLE = Shard()

# model name -> "module:ATTR" of its task object (ATTR defaults to TASK). The
# module's top folder is the model family (one folder may hold several models,
# e.g. resnet/ for resnet18 and resnet50); the family's own Kconfig symbols are
# prefixed with the folder's name in capitals (LENET5_..., RESNET_..., GPT2_...).
TASKS: dict[str, str] = {
    "lenet5": "lenet5.task",
    "gpt2": "gpt2.task",
    "resnet18": "resnet.task:RESNET18",
    "resnet50": "resnet.task:RESNET50",
}


@dataclass(frozen=True)
class Metric:
    """The headline metric of a task and which direction is better."""

    name: str  # "accuracy" or "perplexity"
    higher_is_better: bool
    unit: str = ""  # "%" for accuracy

    def better(self, a: float, b: float) -> bool:
        """True if metric value ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


class Task(Protocol):
    """What a model folder provides."""

    name: str
    metric: Metric
    sample_unit: str  # what throughput counts: "images" or "tokens"

    def prepare(self, spec: RunSpec) -> None:
        """Load the data into memory; raise DataMissingError naming `make prepare-data` if absent."""

    def build_model(self, spec: RunSpec, architecture: dict | None = None) -> nn.Module:
        """A freshly initialised model (the trainer has seeded torch already); with ``architecture`` (what
        ``model.architecture()`` of a model cut by lib/surgery/cut.py returned) the smaller model it describes."""

    def examples_per_epoch(self, spec: RunSpec) -> int:
        """Training examples in one epoch, used to turn EPOCHS into steps."""

    def train_batches(self, spec: RunSpec, micro_batch: int, seed: int, shard: Shard = SINGLE,
                      start: int = 0) -> Iterator[Batch]:
        """An endless stream of training micro-batches, reshuffled every epoch from ``seed``, beginning at
        micro-batch ``start`` of that stream: what a resumed run continues from. The stream is a function
        of the seed and the position; seeking may draw random numbers but reads and yields no batch before
        ``start`` (a task whose ``train_batches`` takes no ``start`` is replayed, and the trainer says so).

        With several ranks the stream of global batches is exactly the single-process
        stream at ``micro_batch * shard.world_size``, and this rank gets its rows
        ``shard.rows(micro_batch)`` of each: one rank is unchanged, epochs stay exact.
        """

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of ``model`` on ``batch`` (already on the model's device)."""

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``model``'s class scores on ``batch``, (examples, classes), and the targets, (examples,): what ``loss``
        takes the cross-entropy of (distillation compares a teacher's)."""

    def samples_in(self, batch: Batch) -> int:
        """How many ``sample_unit`` a batch holds (images, or tokens)."""

    def evaluate(self, model: nn.Module, spec: RunSpec, split: str, shard: Shard = SINGLE) -> dict[str, float]:
        """Metrics on split "val" or "test": {"loss": ..., metric.name: ...}. Runs under no_grad.

        With several ranks each evaluates its chunks ``shard.chunks(...)`` and the sums are
        reduced (lib.train.distributed.reduce_sum), so every rank returns the whole split's metrics.
        """

    def data_fingerprint(self, spec: RunSpec) -> dict[str, str]:
        """Optional: what identifies the data a run used (split contents, token files' SHA-256), for the
        provenance in summary.json (lib/core/provenance.py)."""
        ...

    def usage(self, spec: RunSpec) -> dict[str, str]:
        """Optional: what running an exported model outside the harness needs (input preprocessing, the
        forward's activations and pooling, the tokenizer), for the model card (lib/checkpoint/export.py)."""
        ...

    def initial_state(self, spec: RunSpec) -> dict[str, torch.Tensor] | None:
        """Optional: weights a run that starts from step 0 loads instead of its random initialisation (GPT-2:
        CONFIG_GPT2_INIT_HF, a transformers folder), or None; the trainer calls it before anything else."""
        ...

    def to_hf(self, model: nn.Module, spec: RunSpec) -> Any:
        """Optional: ``model`` in Hugging Face transformers' format, with ``config``, ``tensors``, ``files`` and
        ``notes`` (gpt2/hf.py's HfModel), for `make export FORMAT=hf` (lib/checkpoint/export.py)."""
        ...

    def fetch_data(self, spec: RunSpec) -> str:
        """Download what this task needs into spec.data_dir (`make prepare-data`); say what was done."""

    # -- sizing, for the hardware plan (lib/hardware/__init__.py) ----------------------------------------

    def cpu_micro_batch(self, spec: RunSpec) -> int:
        """The largest micro-batch worth using on a CPU (beyond it a step only gets slower per example)."""

    def gpu_micro_batch(self, spec: RunSpec, gpu: str) -> int | None:
        """The task's own micro-batch for GPU model ``gpu`` (a lib/hardware/gpus.py key), or None to size from
        memory."""

    def flops_per_sample(self, spec: RunSpec) -> float | None:
        """Training FLOPs (forward + backward) per ``sample_unit``, for MFU; None if the task does not count them."""

    def example_batch(self, spec: RunSpec, n: int, device: torch.device) -> Batch:
        """An all-zeros batch of ``n`` examples, shaped like training batches (memory estimates, probing)."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks activation checkpointing may wrap (lib/hardware/actckpt.py), in forward order, each
        taking and returning one tensor; empty when the model has none worth it."""


def first_batches(task: Task, spec: RunSpec, count: int, device: torch.device) -> list[Batch]:
    """The first ``count`` training micro-batches of ``spec``'s seed, whole (the same on every rank), on ``device``:
    what calibration reads (the sweep's data-driven metrics, the owl distribution)."""
    stream = task.train_batches(spec, spec.hardware.micro_batch, spec.seed)
    return [tuple(t.to(device) for t in next(stream)) for _ in range(count)]


def get_task(model: str) -> Task:
    """The task object of model ``model``; a clear error if there is no such model."""
    module, _, attr = lookup(TASKS, model, "model", "lib/core/task.py").partition(":")
    return getattr(importlib.import_module(module), attr or "TASK")


def model_folder(model: str) -> str:
    """The folder (model family) that holds ``model``: its Kconfig is <folder>/Kconfig."""
    return lookup(TASKS, model, "model", "lib/core/task.py").split(".", 1)[0]
