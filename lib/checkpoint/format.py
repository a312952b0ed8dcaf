"""The checkpoint file: a torch.save payload, then a trailer with its length and SHA-256.

    <payload: torch.save bytes><MAGIC><payload length, 20 digits><sha256 hex, 64 chars>\n

torch.save writes the payload to the file itself; the digest is then computed by reading it back
(from the page cache) while the kernel writes it out (fsync), so hashing costs about no time beside
the write. Loading opens the file once, checks the trailer, and hashes the file in a second thread
while torch.load reads the same open file: one copy of the state in memory, and verification overlaps
the load. A truncated, overwritten or bit-flipped file is refused with one line instead of loading
garbage (a state read from a file that fails its check is dropped). The payload is unpickled with
weights_only=True: tensors, numbers, strings and containers only, so a file carrying code is refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lib.core.errors import HarnessError, first_line
from lib.core.files import write_atomic

MAGIC = b"\nHARNESS-CHECKPOINT-1 "
TRAILER = len(MAGIC) + 20 + 64 + 1


class CheckpointError(HarnessError):
    """A checkpoint that cannot be used: truncated, damaged, unsafe or made for another run."""


CHUNK = 8 << 20  # bytes hashed per read: large enough that hashlib releases the GIL and the disk streams


def _sha256(fd: int, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of the open file ``fd``, read with pread (its offset is untouched)."""
    sha, done = hashlib.sha256(), 0
    while done < size:
        chunk = os.pread(fd, min(CHUNK, size - done), done)
        if not chunk:
            break
        sha.update(chunk)
        done += len(chunk)
    return sha.hexdigest()


def _alongside(work: Callable[[], Any], fd: int, size: int) -> tuple[Any, str | BaseException]:
    """Run ``work()`` here while a second thread hashes ``fd``; (work's result, the digest or hashing's error).
    An error of ``work`` is raised after the hash has ended."""
    found: list[str | BaseException] = []

    def hash_it() -> None:
        try:
            found.append(_sha256(fd, size))
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=hash_it, name="checkpoint-sha256", daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        thread.join()
    return result, found[0]


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (lib/core/files.py: tmp, fsync, rename), with its checksum."""

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        with tmp.open("r+b") as raw:
            size = os.fstat(raw.fileno()).st_size
            _, digest = _alongside(lambda: os.fsync(raw.fileno()), raw.fileno(), size)
            if isinstance(digest, BaseException):
                raise digest
            raw.seek(size)
            raw.write(MAGIC + f"{size:020d}".encode() + digest.encode() + b"\n")

    write_atomic(Path(path), write)


def load(path: Path) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, verified; CheckpointError (one line) if it is not sound."""
    path = Path(path)
    try:
        with path.open("rb") as raw:  # one open file: a checkpoint renamed over ``path`` meanwhile is not mixed in
            total = os.fstat(raw.fileno()).st_size
            raw.seek(max(0, total - TRAILER))
            trailer = raw.read(TRAILER)
            if total < TRAILER or not trailer.startswith(MAGIC):
                raise CheckpointError(f"checkpoint {path} is truncated or not a harness checkpoint (no trailer)")
            size = int(trailer[len(MAGIC):len(MAGIC) + 20])
            digest = trailer[len(MAGIC) + 20:-1].decode()
            if size != total - TRAILER:
                raise CheckpointError(f"checkpoint {path} is truncated ({total - TRAILER} of {size} payload bytes)")
            raw.seek(0)
            state, found = _alongside(lambda: _attempt(raw, path), raw.fileno(), size)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if isinstance(found, BaseException):
        raise CheckpointError(f"cannot read checkpoint {path}: {found.strerror or found}")
    if found != digest:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check (the file was damaged after writing)")
    if isinstance(state, CheckpointError):  # a sound file torch cannot read: its own line
        raise state
    return state


def _attempt(stream: BinaryIO, where: Path) -> dict[str, Any] | CheckpointError:
    """load_payload, its refusal returned rather than raised: a damaged file's hash error comes first."""
    try:
        return load_payload(stream, where)
    except CheckpointError as exc:
        return exc


def load_payload(stream: BinaryIO | Path, where: Path) -> dict[str, Any]:
    """Unpickle with weights_only=True; anything beyond tensors and plain data is refused in one line."""
    try:
        state = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"[Uu]nsupported [^\n]*?(?= was not| whose|\. |$)", str(exc), re.M)
        why = found.group(0) if found else type(exc).__name__
        raise CheckpointError(f"refused to load {where}: it holds pickled objects beyond tensors and plain data "
                              f"({why[:160]}); load only files this harness wrote") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where} cannot be read: {first_line(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where} does not hold a dict of state")
    return state
