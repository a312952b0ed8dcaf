"""Training checkpoints of one run folder: when to write them, which to keep, which to resume from.

    checkpoints/step_00000400.ckpt   the last `keep_last` training checkpoints (full state)
    checkpoints/latest               the file name of the newest complete one
    checkpoints/milestones/          every `milestone_every` steps, kept for good
    checkpoints/best.pt              the best-by-validation checkpoint (the trainer's, as before)

A checkpoint is complete before `latest` moves to it (both writes are atomic), so a
process killed at any moment leaves `latest` naming a whole file. Loading checks the
SHA-256 of the file `latest` names; a damaged one falls back to the next older one,
and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.checkpoint.format import CheckpointError, load, save
from lib.core.files import write_text_atomic

STEP_FILE = re.compile(r"^step_(\d{8})\.ckpt$")
LATEST = "latest"
MILESTONES = "milestones"


def shards_of(ckpt: Path) -> Path:
    """The folder of shards beside a sharded (FSDP2) run's training checkpoint file (lib/train/sharding.py)."""
    return ckpt.with_suffix(".dcp")


def read_shards(ckpt: Path) -> dict[str, Any]:
    """The whole tensors of a sharded checkpoint's shards, read in this one process (no process group)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(shards_of(ckpt), Path(tmp) / "whole.pt")
        return torch.load(Path(tmp) / "whole.pt", weights_only=False)  # written just now, by this process


def _drop(ckpt: Path) -> None:
    """A training checkpoint file and its shards, if any."""
    ckpt.unlink(missing_ok=True)
    shutil.rmtree(shards_of(ckpt), ignore_errors=True)


def step_file(step: int) -> str:
    """The file name of the training checkpoint written at the end of ``step``."""
    return f"step_{step:08d}.ckpt"


@dataclass
class Policy:
    """When training checkpoints are written and how many are kept (from TrainSettings)."""

    interval: int = 0  # steps between checkpoints; 0 = not by steps
    time_interval_s: float = 0.0  # seconds between checkpoints; 0 = not by time
    keep_last: int = 3
    milestone_every: int = 0  # also keep a copy every this many steps; 0 = none

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise CheckpointError(f"keep_last={self.keep_last}: keep at least 1 training checkpoint "
                                  f"(CONFIG_CKPT_KEEP_LAST)")


@dataclass
class Manager:
    """Writes and finds the training checkpoints under ``folder``."""

    folder: Path
    policy: Policy
    say: Callable[[str], None] = print
    last_time: float = field(default_factory=time.monotonic)

    def due(self, step: int) -> bool:
        """True when the policy asks for a checkpoint after ``step``."""
        p = self.policy
        by_steps = p.interval > 0 and step % p.interval == 0
        by_time = p.time_interval_s > 0 and time.monotonic() - self.last_time >= p.time_interval_s
        return by_steps or by_time

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step``, move `latest` to it, drop the ones past keep_last."""
        path = self.install(step, payload)
        self.last_time = time.monotonic()
        if self.policy.milestone_every and step % self.policy.milestone_every == 0:
            milestones = self.folder / MILESTONES
            milestones.mkdir(exist_ok=True)
            target = milestones / path.name
            _drop(target)
            os.link(path, target)  # the same bytes, kept when the training copy is dropped
            if shards_of(path).is_dir():
                shutil.copytree(shards_of(path), shards_of(target), copy_function=os.link)
        for old in self.steps()[:-self.policy.keep_last]:
            _drop(old)
        return path

    def install(self, step: int, payload: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (replacing one of that step) and move `latest` to it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / step_file(step)
        save(path, payload)  # DiskFullError / HarnessError: `latest` still names the previous one
        write_text_atomic(self.folder / LATEST, path.name + "\n")
        return path

    def milestones(self) -> list[Path]:
        """The milestones kept for good, oldest first."""
        folder = self.folder / MILESTONES
        return sorted(p for p in folder.iterdir() if STEP_FILE.match(p.name)) if folder.is_dir() else []

    def steps(self) -> list[Path]:
        """The training checkpoints present, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if STEP_FILE.match(p.name))

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies, starting from `latest`; None when there is none at all.

        A damaged one is skipped with a note; when every one is damaged, CheckpointError says so.
        """
        for stale in self.folder.glob(".*.tmp") if self.folder.is_dir() else ():
            if stale.is_dir():  # shards a kill cut short (every rank of a sharded run looks; one removes)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)  # a write a kill cut short; the run lock says no one else writes here
            self.say(f"checkpoint: removed {stale.name}, left by a write that was cut short")
        candidates = list(reversed(self.steps()))
        pointer = self._pointer()
        if pointer is not None and pointer in candidates:  # normally the newest; trust it first
            candidates.remove(pointer)
            candidates.insert(0, pointer)
        problems = []
        for path in candidates:
            try:
                payload = load(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                self.say(f"checkpoint: {exc}; trying the one before")
                continue
            return path, payload
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.folder} ({problems[-1]}); move that folder "
                                  f"away to restart the run from step 0")
        return None

    def _pointer(self) -> Path | None:
        try:
            name = (self.folder / LATEST).read_text().strip()
        except OSError:
            return None
        return self.folder / name if STEP_FILE.match(name) else None

    def remove_training(self) -> None:
        """Drop the training checkpoints and `latest` (a finished run needs neither); keep best and milestones."""
        for path in self.steps():
            _drop(path)
        (self.folder / LATEST).unlink(missing_ok=True)
