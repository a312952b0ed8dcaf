"""The checkpoint file: a torch.save payload, then a trailer with its length and SHA-256.

    <payload: torch.save bytes><MAGIC><payload length, 20 digits><sha256 hex, 64 chars>\n

The digest is computed while the payload is written (no second copy in memory) and
checked on every load, so a truncated, overwritten or bit-flipped file is refused with
one line instead of loading garbage. The payload is unpickled with weights_only=True:
tensors, numbers, strings and containers only, so a file carrying code is refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lib.core.errors import HarnessError, first_line
from lib.core.files import write_atomic

MAGIC = b"\nHARNESS-CHECKPOINT-1 "
TRAILER = len(MAGIC) + 20 + 64 + 1


class CheckpointError(HarnessError):
    """A checkpoint that cannot be used: truncated, damaged, unsafe or made for another run."""


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (lib/core/files.py: tmp, fsync, rename), with its checksum."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as raw:
            out = _HashingWriter(raw)
            torch.save(payload, out)
            raw.write(MAGIC + f"{out.size:020d}".encode() + out.sha.hexdigest().encode() + b"\n")

    write_atomic(Path(path), write)


def load(path: Path) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, verified; CheckpointError (one line) if it is not sound."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    trailer = data[-TRAILER:]
    if len(data) < TRAILER or not trailer.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is truncated or not a harness checkpoint (no trailer)")
    size = int(trailer[len(MAGIC):len(MAGIC) + 20])
    digest = trailer[len(MAGIC) + 20:-1].decode()
    payload = memoryview(data)[:-TRAILER]
    if size != len(payload):
        raise CheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {size} payload bytes)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check (the file was damaged after writing)")
    return load_payload(io.BytesIO(payload), path)


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
