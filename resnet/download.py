"""Fetch the official CIFAR-10/100 python archives (`make prepare-data`).

The archive is streamed to a .part file while its MD5 is computed, checked
against the published digest, then unpacked member by member into a staging
folder inside the destination (refusing absolute paths, ``..``, links and
devices), checked by reading every batch, and moved into place with one rename.
A folder that already reads as complete is left alone.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from lib.core.errors import HarnessError
from resnet.data import CifarLayout, is_complete, layout_of

CIFAR_BASE_URLS = ["https://www.cs.toronto.edu/~kriz/"]
DOWNLOAD_TIMEOUT_S = 60
CHUNK = 1 << 20

Opener = Callable[..., Any]  # urlopen-like: opener(url, timeout=...) -> readable context manager


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fetch(url: str, target: Path, opener: Opener) -> str:
    """Stream ``url`` into ``target``; returns the MD5 hex digest of what was written."""
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check against the published digest
    with opener(url, timeout=DOWNLOAD_TIMEOUT_S) as response, target.open("wb") as out:
        while chunk := response.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _check_member(member: tarfile.TarInfo, folder: str) -> PurePosixPath:
    """The member's relative path; HarnessError for anything that could land outside ``folder``."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise HarnessError(f"refusing archive member {member.name!r}: absolute path or '..'")
    if not (member.isreg() or member.isdir()):
        raise HarnessError(f"refusing archive member {member.name!r}: not a regular file or folder")
    if not path.parts or path.parts[0] != folder:
        raise HarnessError(f"refusing archive member {member.name!r}: outside {folder}/")
    return path


def _extract(archive: Path, dest: Path, layout: CifarLayout) -> None:
    """Unpack ``archive`` into dest/<layout.folder>, replacing what was there only once it is complete."""
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    target = staging.joinpath(*_check_member(member, layout.folder).parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        raise tarfile.TarError(f"no contents for {member.name}")
                    with source, target.open("wb") as out:
                        shutil.copyfileobj(source, out)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise HarnessError(f"{archive.name}: cannot unpack ({_one_line(exc)}); run `make prepare-data` "
                               "again") from None
        if not is_complete(staging, layout):
            raise HarnessError(f"{archive.name} does not hold the {layout.name} batch files "
                               f"({', '.join(layout.train_files + layout.test_files)}) in {layout.folder}/")
        final = dest / layout.folder
        if final.exists():  # an incomplete or damaged earlier copy: is_complete(dest) said so
            shutil.rmtree(final)
        (staging / layout.folder).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_cifar(which: str, dest: Path, base_urls: list[str] | None = None,
                   opener: Opener = urllib.request.urlopen, expected_md5: str | None = None) -> bool:
    """Make dest/<folder> hold CIFAR ``which`` ("cifar10" or "cifar100"); True if it was downloaded.

    ``base_urls`` are tried in turn (default: the official Toronto site); the archive
    must match ``expected_md5`` (default: the published digest). Nothing is fetched if
    the files are already there and readable.
    """
    layout = layout_of(which)
    dest = Path(dest)
    if is_complete(dest, layout):
        return False
    mirrors = CIFAR_BASE_URLS if base_urls is None else list(base_urls)
    if not mirrors:
        raise HarnessError("download_cifar: no base URLs given")
    md5 = (expected_md5 or layout.md5).lower()
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / (layout.archive + ".part")
    tried = []
    try:
        for base in mirrors:
            url = (base if base.endswith("/") else base + "/") + layout.archive
            try:
                got = _fetch(url, archive, opener)
            except (OSError, http.client.HTTPException) as exc:  # URLError/HTTPError are OSError
                tried.append(f"{url} ({_one_line(exc)})")
                continue
            if got == md5:
                _extract(archive, dest, layout)
                return True
            tried.append(f"{url} (MD5 {got}, expected {md5}: damaged or not the official archive)")
        raise HarnessError(
            f"could not download {layout.archive}: tried {'; '.join(tried)}; `make prepare-data` needs the "
            f"network (or unpack the official {layout.archive} into {dest})"
        )
    finally:
        archive.unlink(missing_ok=True)
