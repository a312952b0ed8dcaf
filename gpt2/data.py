"""Reading the GPT-2 token shards written by gpt2/prepare.py: checks, training windows, evaluation windows.

A shard is a flat uint16 file of token ids. A training example is a random
window of block_size + 1 tokens (x = w[:-1], y = w[1:]); evaluation uses a fixed
set of windows drawn with a constant seed, so every run of the same data and
block size is scored on the same text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2.prepare import DTYPE, FORMAT
from gpt2.sources import SPLITS
from gpt2.tokenizer import EOT, NAME
from lib.core.errors import DataMissingError
from lib.train.distributed import SINGLE, Shard

EVAL_SEED = 20190214  # fixed, independent of the run seed: every run evaluates the same windows
SCAN_CHUNK = 1 << 24  # tokens per read when checking ids (32 MB)
SCAN_CHUNKS = 16  # a bigger shard is checked on this many evenly spaced chunks, not read whole


@dataclass(frozen=True)
class Shards:
    """A prepared dataset whose files have been checked against its meta.json."""

    root: Path
    tokens: dict[str, int]
    meta: dict[str, Any]

    def path(self, split: str) -> Path:
        return self.root / f"{split}.bin"


def _fix(dataset: str) -> str:
    return f"run `make prepare-data` to prepare GPT-2 dataset {dataset!r}"


def load_shards(root: Path, *, dataset: str, source: str, token_budget: int, vocab_size: int,
                block_size: int) -> Shards:
    """Check the prepared shards in ``root`` and return them; one clear DataMissingError if anything is off."""
    fix = _fix(dataset)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataMissingError(f"GPT-2 dataset {dataset!r} is not prepared ({meta_path} is missing); {fix}")
    try:
        meta = json.loads(meta_path.read_text())
        status, tokens, settings = meta["status"], meta["tokens"], meta["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataMissingError(f"{meta_path} is unreadable ({exc}); {fix} again") from None
    if status != "done":
        raise DataMissingError(f"preparing GPT-2 dataset {dataset!r} was interrupted ({root}); {fix} (it resumes)")
    found = (meta.get("format"), meta.get("tokenizer"), meta.get("dtype"), meta.get("eot"))
    if found != (FORMAT, NAME, DTYPE, EOT):
        raise DataMissingError(f"{meta_path} says format/tokenizer/dtype/eot {found}, expected "
                               f"{(FORMAT, NAME, DTYPE, EOT)}; delete {root} and {fix}")
    wanted = {"dataset": dataset, "source": source, "token_budget": token_budget}
    recorded = {key: settings.get(key) for key in wanted}
    if recorded != wanted:
        diff = ", ".join(f"{k} {recorded[k]!r} (config: {wanted[k]!r})" for k in wanted if recorded[k] != wanted[k])
        raise DataMissingError(f"{root} was prepared with {diff}; {fix} again for the current .config")
    for split in SPLITS:
        _check_file(root / f"{split}.bin", int(tokens[split]), vocab_size, block_size, fix)
    return Shards(root, {s: int(tokens[s]) for s in SPLITS}, meta)


def _check_file(path: Path, count: int, vocab_size: int, block_size: int, fix: str) -> None:
    if not path.is_file():
        raise DataMissingError(f"{path} is missing; {fix} again")
    size = path.stat().st_size
    if size % 2:
        raise DataMissingError(f"{path}: {size} bytes is not a whole number of uint16 tokens (truncated?); "
                               f"{fix} again")
    if size // 2 != count:
        raise DataMissingError(f"{path} holds {size // 2} tokens but meta.json says {count} (truncated or "
                               f"corrupt); {fix} again")
    if count < block_size + 1:
        raise DataMissingError(f"{path} holds {count} tokens, fewer than one window of CONFIG_GPT2_BLOCK_SIZE + 1 "
                               f"= {block_size + 1}; lower the block size or prepare more text")
    top = _max_token(path, count)
    if top >= vocab_size:
        raise DataMissingError(f"{path} has token id {top} but the model's vocabulary is {vocab_size} "
                               f"(CONFIG_GPT2_VOCAB_SIZE); raise it to at least {top + 1} or {fix} again")


def _max_token(path: Path, count: int) -> int:
    """Largest id in the shard: read whole when small, else SCAN_CHUNKS evenly spaced chunks (bounded time)."""
    data = np.memmap(path, dtype=np.uint16, mode="r", shape=(count,))
    n_chunks = -(-count // SCAN_CHUNK)
    picks = range(n_chunks) if n_chunks <= SCAN_CHUNKS else np.linspace(0, n_chunks - 1, SCAN_CHUNKS).astype(int)
    top = max(int(data[i * SCAN_CHUNK:(i + 1) * SCAN_CHUNK].max()) for i in picks)
    del data
    return top


def _windows(path: Path, count: int, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A fresh memmap per read: pages of a long-lived mapping stay counted in this process's RSS,
    # which would make the peak-memory figure grow with the shard size.
    data = np.memmap(path, dtype=np.uint16, mode="r", shape=(count,))
    windows = np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64)
    del data
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def train_batches(shards: Shards, block_size: int, micro_batch: int, seed: int,
                  shard: Shard = SINGLE, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless (x, y) batches of ``micro_batch`` random windows from train.bin; the same ``seed``, the same stream.

    With several ranks the starts are drawn for the global batch (micro x world) and
    this rank reads only its rows' windows. From batch ``start`` on: the starts of the batches
    before it are drawn (a few microseconds each) and no window of them is read.
    """
    rng = np.random.default_rng(seed)
    count = shards.tokens["train"]
    rows = shard.rows(micro_batch)
    for _ in range(start):
        rng.integers(0, count - block_size, size=micro_batch * shard.world_size)
    while True:
        # the window's last token must exist
        starts = rng.integers(0, count - block_size, size=micro_batch * shard.world_size)
        yield _windows(shards.path("train"), count, starts[rows], block_size)


def eval_starts(count: int, block_size: int, n_windows: int, split: str) -> np.ndarray:
    """The fixed window starts of an evaluation: a constant seed per split, sorted for locality."""
    rng = np.random.default_rng([EVAL_SEED, SPLITS.index(split)])
    return np.sort(rng.integers(0, count - block_size, size=n_windows))


def eval_windows(shards: Shards, split: str, block_size: int, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the evaluation windows of ``split`` ("val" or "test")."""
    count = shards.tokens[split]
    return _windows(shards.path(split), count, eval_starts(count, block_size, n_windows, split), block_size)
