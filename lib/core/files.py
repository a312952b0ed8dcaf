"""Writing the harness's files: a reader never sees half a file, and a full disk is one clear line.

Every file a run or a report depends on (summary.json, matrix.json, spec.json,
checkpoints, report.md) is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the old one. When the write fails the
temporary file is removed and the old file, if any, stays as it was. A full
disk (ENOSPC, EDQUOT) becomes DiskFullError, whose message names the path and
the free space there; the matrix stops on it, and `make continue` finishes the
folder once space is freed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.core.errors import HarnessError
from lib.core.units import kib_or_mib

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(HarnessError):
    """No space left where the harness writes; the message names the path and the free space."""


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError that means the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def write_error(path: Path, exc: OSError) -> HarnessError:
    """The one-line error for a failed write of ``path``."""
    if is_disk_full(exc):
        return DiskFullError(f"disk full writing {path} ({free_space(path)} free there); "
                             f"free some space, then run `make continue` to finish")
    if exc.errno in READ_ONLY:
        return HarnessError(read_only_line(path, exc))
    return HarnessError(f"cannot write {path}: {exc.strerror or exc}")


READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def read_only_line(path: Path, exc: OSError | None = None) -> str:
    why = (exc.strerror if exc else None) or "no write permission"
    return (f"cannot write {path}: {why}; make its folder writable, or copy the results folder somewhere "
            f"writable (cp -r) and point RESULTS= or RUN= there")


def require_writable(folder: Path) -> None:
    """One line, before anything is written, when ``folder`` is on a read-only file system or not writable
    by this user (report, graphs, export, surgery, sweep and continue all write into the folder they read)."""
    folder = Path(folder)
    if os.access(folder, os.W_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    code = errno.EROFS if read_only else errno.EACCES
    raise HarnessError(read_only_line(folder, OSError(code, os.strerror(code))))


def free_space(path: Path) -> str:
    """Free space on the file system holding ``path`` (or its nearest existing parent), as text."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown space"
    return kib_or_mib(free, kib_digits=0)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    Raises DiskFullError or HarnessError (one line) when the write fails; no temporary file is left.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # a writer that made it 0600 (safetensors does) follows the umask too
        tmp.replace(path)
    except OSError as exc:
        _discard(tmp)
        raise write_error(path, exc) from None
    except RuntimeError:  # torch.save reports a short write as RuntimeError, without an errno
        full = _nearly_full(tmp)
        _discard(tmp)
        if full:
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    """Remove a failed write's temporary file; on a read-only file system even a missing one cannot be
    unlinked (EROFS before the lookup), and that must not hide the first error."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _nearly_full(path: Path) -> bool:
    """Under 1 MiB free where ``path`` lives: how a write that failed without an errno is recognised."""
    try:
        return shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (see write_atomic)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, read in 1 MiB chunks (a checkpoint need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
