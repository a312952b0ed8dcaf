"""A run's export/ folder: one version per `make export`, never overwritten, and a `latest` pointer.

    export/v1/          model.safetensors, model_card.json (and hf/ with FORMAT=hf)
    export/v2/          the next `make export`, whatever its options
    export/latest       "v2": moved only once v2 is complete

A version is written into export/.v<N>.partial/ and renamed to v<N> when complete: renaming a folder is
atomic and refuses an existing target, so a kill in the middle leaves no half version and no earlier
version is ever replaced. The next export removes a partial folder it finds and takes the next number.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lib.core.errors import HarnessError
from lib.core.files import write_text_atomic

FOLDER = "export"
LATEST = "latest"
VERSION = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class Version:
    """A version being written: its number and the folder it is written into."""

    number: int
    folder: Path

    @property
    def name(self) -> str:
        return f"v{self.number}"


@dataclass(frozen=True)
class ExportVersions:
    """The versions under ``run_dir``/export/."""

    run_dir: Path

    @property
    def folder(self) -> Path:
        return Path(self.run_dir) / FOLDER

    def versions(self) -> list[Path]:
        """The complete versions, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and VERSION.match(p.name)]
        return sorted(found, key=lambda p: int(VERSION.match(p.name)[1]))

    def latest(self) -> Path | None:
        """The version `latest` names (else the newest complete one); None before the first export."""
        try:
            name = (self.folder / LATEST).read_text().strip()
        except OSError:
            name = ""
        if VERSION.match(name) and (self.folder / name).is_dir():
            return self.folder / name
        versions = self.versions()
        return versions[-1] if versions else None

    @contextlib.contextmanager
    def new(self) -> Iterator[Version]:
        """A fresh version to write into; it becomes export/v<N> and `latest` only if the block completes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".v*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # an export a kill cut short
        number = max((int(VERSION.match(p.name)[1]) for p in self.versions()), default=0) + 1
        version = Version(number, self.folder / f".v{number}.partial")
        version.folder.mkdir()
        try:
            yield version
        except BaseException:
            shutil.rmtree(version.folder, ignore_errors=True)
            raise
        final = self.folder / version.name
        try:
            os.rename(version.folder, final)  # refuses an existing v<N>: nothing earlier is overwritten
        except OSError as exc:
            shutil.rmtree(version.folder, ignore_errors=True)
            raise HarnessError(f"{final} appeared while this export was written ({exc.strerror}); is another "
                               f"`make export` running on {self.run_dir}? Run it again") from None
        write_text_atomic(self.folder / LATEST, version.name + "\n")


def resolve(folder: Path) -> Path:
    """An export version folder from what a user names: a version, export/ (its latest), or a run folder."""
    folder = Path(folder)
    if (folder / "model_card.json").is_file():
        return folder  # a version (or an export made before versions)
    for run_dir in (folder.parent, folder) if folder.name == FOLDER else (folder,):
        latest = ExportVersions(run_dir).latest()
        if latest is not None:
            return latest
    raise HarnessError(f"{folder} holds no export (no model_card.json and no export/v<N>/); run `make export RUN=...`")
