"""A resumed run seeks its data stream (Task.train_batches(start=...)) instead of replaying it: the stream from
position p is the stream's tail from p, for every family; a resume at a late step draws no batch before
training; a task that cannot seek is replayed with one line."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
from pathlib import Path

import torch

from lib.checkpoint import load as load_checkpoint
from lib.checkpoint.manager import Manager, Policy
from lib.core.spec import RunSpec
from lib.train import classification
from lib.train import run as run_mod
from lib.train.distributed import Shard
from tests.conftest import synthetic_spec, tiny_spec, trained_run

LATE = 100_000  # micro-batches: replaying them would read 6.4 M images


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q, strict=True))
                                    for p, q in zip(a, b, strict=True))


def test_every_family_starts_its_stream_where_the_replayed_stream_is(tmp_path: Path) -> None:
    from gpt2.task import TASK as GPT
    from lenet5.task import TASK as LENET

    lenet, gpt = tiny_spec("s"), synthetic_spec(tmp_path)
    for task, spec, micro, skip in ((LENET, lenet, 7, 8_000), (GPT, gpt, 3, 50)):  # LeNet: over one epoch
        task.prepare(spec)
        replayed = list(itertools.islice(task.train_batches(spec, micro, seed=4), skip + 3))[skip:]
        assert _same(list(itertools.islice(task.train_batches(spec, micro, seed=4, start=skip), 3)), replayed)
    # the classification stream, rank by rank, across an epoch boundary that splits a batch
    two = [Shard(rank, 2) for rank in (0, 1)]
    for shard in two:
        whole = list(itertools.islice(classification.global_batches(10, 3, 1, shard), 12))
        seeked = classification.global_batches(10, 3, 1, shard, 5)
        assert all(torch.equal(a, next(seeked)) for a in whole[5:])


def test_resnet_skips_the_augmentation_draws_of_the_batches_before_start() -> None:
    from resnet.data import augment, augment_draws

    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.uint8).reshape(2, 3, 32, 32)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(4):
        augment(images, a)
        augment_draws(2, b)
    assert torch.equal(augment(images, a), augment(images, b))


def test_a_resume_at_a_late_step_draws_no_batch_before_training(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint made at step LATE without training to it (an early checkpoint relabelled): the resumed
    run trains its last 2 steps and draws their micro-batches, none before them."""
    from lenet5.task import LeNet5Task

    early = trained_run(tmp_path, tiny_spec("early", max_iters=4, ckpt_interval=2, ckpt_milestone=2))
    state = load_checkpoint(next((early / "checkpoints").rglob("step_*.ckpt")))  # its step-2 milestone
    spec = dataclasses.replace(RunSpec.from_dict(state["spec"]), name="late")
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, max_iters=LATE + 2))
    run_dir = tmp_path / "late"
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    progress = {**state["progress"], "step": LATE, "provisional": LATE + 2, "samples": LATE * 64}
    Manager(run_dir / "checkpoints", Policy(interval=2)).save(LATE, {**state, "step": LATE, "progress": progress,
                                                                     "spec": spec.to_dict()})
    drawn: list[int] = []
    real = LeNet5Task.train_batches

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 (the task's own signature)
        for batch in real(self, *args, **kwargs):
            drawn.append(1)
            yield batch

    counted.__signature__ = inspect.signature(real)  # it still takes start=
    monkeypatch.setattr(LeNet5Task, "train_batches", counted)
    assert run_mod.run(run_dir) == 0
    accum = state["progress"]["grad_accum"]
    assert accum >= 1 and len(drawn) == 2 * accum  # the two steps after the checkpoint, nothing before them
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] == {"count": 1, "from_steps": [LATE]} and summary["steps"]["done"] == LATE + 2


def test_a_task_that_cannot_seek_is_replayed_with_one_line(tmp_path: Path, capsys) -> None:
    from lib.train import trainer

    class OldTask:  # a plug-in written before start= existed
        def train_batches(self, spec, micro_batch, seed, shard=None):  # noqa: ANN001, ANN201
            yield from ((torch.tensor([i]),) for i in itertools.count())

    spec = tiny_spec("old")
    stream = trainer._stream_at(OldTask(), spec, 4, Shard(0, 1), 5)
    assert next(stream)[0].item() == 5
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "data stream cannot seek (its train_batches takes no start); replaying 5 " \
                              "micro-batches" in out[0], out
