"""The checkpoints/ folder of one run: the only code that knows its file names.

    checkpoints/best.pt                   the best-by-validation weights (model, pruner, step, architecture)
    checkpoints/step_00000400.ckpt        training checkpoints, full state (manager.py: when, how many)
    checkpoints/latest                    the file name of the newest complete training checkpoint
    checkpoints/milestones/               a training checkpoint every CKPT_MILESTONE steps, kept for good
    checkpoints/before_surgery/           what `make surgery` replaced: the uncut checkpoint and best

Everything else (the trainer, surgery, sweep, export, `make status`) asks this class;
the layout can change here alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.checkpoint.format import load, save
from lib.checkpoint.manager import LATEST, Manager, Policy, step_file
from lib.core.errors import HarnessError

FOLDER = "checkpoints"
BEST = "best.pt"
ASIDE = "before_surgery"
BULKY_PATTERNS = ("*.pt", "*.ckpt")  # every checkpoint file, for cleaners that keep only the small records


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoint folder of the run in ``run_dir``."""

    run_dir: Path

    @property
    def folder(self) -> Path:
        return Path(self.run_dir) / FOLDER

    # -- the best checkpoint -------------------------------------------------------------------

    @property
    def best(self) -> Path:
        return self.folder / BEST

    @property
    def best_in_run(self) -> str:
        """The best checkpoint's path relative to the run folder, for records."""
        return f"{FOLDER}/{BEST}"

    def require_best(self, purpose: str) -> Path:
        """The best checkpoint's path, or one line saying why there is none (``purpose``: "sweep", "export")."""
        if not self.best.is_file():
            raise HarnessError(f"{self.run_dir} has no best checkpoint ({self.best} is missing: the run did not "
                               f"reach an eligible evaluation, is unfinished, or ran with CONFIG_KEEP_CHECKPOINTS "
                               f"off); nothing to {purpose}")
        return self.best

    def save_best(self, payload: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save(self.best, payload)  # atomic and verified: a full disk leaves the previous best whole

    def load_best(self) -> dict[str, Any]:
        return load(self.best)

    def drop_best(self) -> None:
        self.best.unlink(missing_ok=True)

    # -- training checkpoints ------------------------------------------------------------------

    def training(self, policy: Policy, say: Callable[[str], None] = print) -> Manager:
        """The writer and finder of training checkpoints under this folder."""
        return Manager(self.folder, policy, say)

    def resumable(self) -> bool:
        """True when a training checkpoint waits for `make continue` (the `latest` pointer exists)."""
        return (self.folder / LATEST).exists()

    def newest_to_cut(self) -> tuple[Path, dict[str, Any]]:
        """For surgery: the newest training checkpoint that verifies, else the newest milestone."""
        found = self.training(Policy()).latest()
        if found:
            return found
        kept = self.training(Policy()).milestones()
        if not kept:
            raise HarnessError(f"surgery: {self.run_dir} has no training checkpoint (a finished run keeps only its "
                               f"best checkpoint, which has no optimizer state); set CONFIG_CKPT_MILESTONE=N to "
                               f"keep one for good")
        return kept[-1], load(kept[-1])

    def replace_after_surgery(self, step: int, source: Path, payload: dict[str, Any]) -> Path:
        """Make ``payload`` (the smaller model's state) the newest training checkpoint; the uncut checkpoint
        ``source`` and the best checkpoint (of the uncut model, never loaded into the cut one) go aside."""
        aside = self.folder / ASIDE
        aside.mkdir(exist_ok=True)
        kept = aside / step_file(step)
        kept.unlink(missing_ok=True)
        os.link(source, kept)  # the same bytes; replacing the target below leaves them whole
        target = self.training(Policy()).install(step, payload)
        if self.best.exists():
            os.replace(self.best, aside / BEST)
        return target
