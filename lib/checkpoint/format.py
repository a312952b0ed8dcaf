"""The checkpoint file: a torch.save payload, then a trailer with its length and digest.

    <payload: torch.save bytes><MAGIC2><payload length, 20 digits><digest hex, 64 chars>\n

The digest (format 2) is the SHA-256 of the SHA-256s of the payload's 64 MiB blocks, in order, so the
blocks can be hashed on several cores; format 1 files (MAGIC, one SHA-256 of the whole payload) load
as before. torch.save writes the payload to the file itself; the blocks are then hashed by reading
them back (from the page cache) on two threads while the kernel writes the file out (fsync). Loading
opens the file once, checks the trailer, and hashes the file in a second thread while torch.load
reads the same open file: one copy of the state in memory, and verification overlaps the load. A
truncated, overwritten or bit-flipped file is refused with one line instead of loading garbage (a
state read from a file that fails its check is dropped). The payload is unpickled with
weights_only=True: tensors, numbers, strings and containers only, so a file carrying code is refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lib.core.errors import HarnessError, first_line
from lib.core.files import write_atomic

MAGIC = b"\nHARNESS-CHECKPOINT-1 "  # format 1: one SHA-256 of the payload
MAGIC2 = b"\nHARNESS-CHECKPOINT-2 "  # format 2: the SHA-256 of its blocks' SHA-256s (what save writes)
TRAILER = len(MAGIC) + 20 + 64 + 1
BLOCK = 64 << 20


class CheckpointError(HarnessError):
    """A checkpoint that cannot be used: truncated, damaged, unsafe or made for another run."""


CHUNK = 8 << 20  # bytes hashed per read: large enough that hashlib releases the GIL and the disk streams


def _sha256(fd: int, size: int, start: int = 0) -> bytes:
    """SHA-256 of bytes [start, start + size) of the open file ``fd``, read with pread (its offset untouched)."""
    sha, done = hashlib.sha256(), 0
    while done < size:
        chunk = os.pread(fd, min(CHUNK, size - done), start + done)
        if not chunk:
            break
        sha.update(chunk)
        done += len(chunk)
    return sha.digest()


def digest(fd: int, size: int, version: int = 2, threads: int = 1) -> str:
    """The trailer's digest of the first ``size`` bytes of ``fd``: format 1, one SHA-256; format 2, the SHA-256
    of the SHA-256s of its BLOCK-sized blocks, hashed on ``threads`` threads."""
    if version == 1:
        return _sha256(fd, size).hex()
    starts = range(0, size, BLOCK)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-sha256") as pool:
            blocks = list(pool.map(lambda start: _sha256(fd, min(BLOCK, size - start), start), starts))
    else:
        blocks = [_sha256(fd, min(BLOCK, size - start), start) for start in starts]
    return hashlib.sha256(b"".join(blocks)).hexdigest()


def _alongside(work: Callable[[], Any], hashing: Callable[[], str]) -> tuple[Any, str | BaseException]:
    """Run ``work()`` here while a second thread runs ``hashing()``; (work's result, the digest or hashing's
    error). An error of ``work`` is raised after the hash has ended."""
    found: list[str | BaseException] = []

    def hash_it() -> None:
        try:
            found.append(hashing())
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=hash_it, name="checkpoint-digest", daemon=True)
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
            fd = raw.fileno()
            size = os.fstat(fd).st_size
            _, found = _alongside(lambda: os.fsync(fd), lambda: digest(fd, size, 2, threads=2))
            if isinstance(found, BaseException):
                raise found
            raw.seek(size)
            raw.write(MAGIC2 + f"{size:020d}".encode() + found.encode() + b"\n")

    write_atomic(Path(path), write)


def load(path: Path) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, verified; CheckpointError (one line) if it is not sound."""
    path = Path(path)
    try:
        with path.open("rb") as raw:  # one open file: a checkpoint renamed over ``path`` meanwhile is not mixed in
            total = os.fstat(raw.fileno()).st_size
            raw.seek(max(0, total - TRAILER))
            trailer = raw.read(TRAILER)
            if total < TRAILER or not trailer.startswith((MAGIC, MAGIC2)):
                raise CheckpointError(f"checkpoint {path} is truncated or not a harness checkpoint (no trailer)")
            version = 1 if trailer.startswith(MAGIC) else 2
            size = int(trailer[len(MAGIC):len(MAGIC) + 20])
            expected = trailer[len(MAGIC) + 20:-1].decode()
            if size != total - TRAILER:
                raise CheckpointError(f"checkpoint {path} is truncated ({total - TRAILER} of {size} payload bytes)")
            raw.seek(0)
            fd = raw.fileno()
            state, found = _alongside(lambda: _attempt(raw, path), lambda: digest(fd, size, version))
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if isinstance(found, BaseException):
        raise CheckpointError(f"cannot read checkpoint {path}: {found.strerror or found}")
    if found != expected:
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
