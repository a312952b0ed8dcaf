"""`make prepare-data` for GPT-2: rows of text -> uint16 token shards, resumable.

``prepare_rows`` tokenizes a stream of rows ``{"text": ...}`` (gpt2/sources.py)
in parallel (a process pool over documents), writes ``train.bin``, ``val.bin``
and ``test.bin`` under <data_dir>/gpt2/<dataset>/ with <|endoftext|> before
every document, and stops at the token budget. After each chunk of documents it
appends the tokens, fsyncs, and records in meta.json how many rows were
consumed and how many tokens each shard holds, so an interrupted run resumes
where the last chunk ended. Tests and benchmarks inject rows of their own, or
write ready-made token arrays with ``write_shards``.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.sources import SPLITS, Row, default_rows
from gpt2.tokenizer import EOT, NAME, VOCAB, gpt2_encoding
from lib.core.errors import HarnessError
from lib.core.files import write_json_atomic

DTYPE = "uint16"  # every GPT-2 id (< 50257) fits; half the bytes of int32
FORMAT = 1  # of meta.json and the shards
HOLDOUT_EVERY = 100  # rows without a split: of every 100, one goes to val and one to test
CHUNK_DOCS = 1024  # rows per commit: at most what a restart has to redo


def shard_dir(data_dir: str | Path, dataset: str) -> Path:
    """Where dataset ``dataset`` is prepared: <data_dir>/gpt2/<dataset>/."""
    return Path(data_dir) / "gpt2" / dataset


def prepare_dataset(dataset: str, out_dir: Path, *, source: str, token_budget: int, rows: Iterable[Row] | None = None,
                    text_dir: Path | None = None, workers: int = 0, chunk_docs: int = CHUNK_DOCS) -> dict[str, Any]:
    """Prepare ``dataset`` into ``out_dir`` from its real source, or from ``rows`` when given (tests)."""
    if rows is None:
        rows = default_rows(dataset, out_dir, text_dir)
    return prepare_rows(rows, out_dir, dataset=dataset, source=source, token_budget=token_budget,
                        workers=workers, chunk_docs=chunk_docs)


def write_shards(out_dir: Path, tokens: Mapping[str, np.ndarray], *, dataset: str, source: str,
                 token_budget: int) -> dict[str, Any]:
    """Write ready-made token arrays as a finished dataset with its meta.json (synthetic data for tests, benches)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _fresh_meta(_settings(dataset, source, token_budget, HOLDOUT_EVERY))
    for split in SPLITS:
        ids = np.asarray(tokens[split], dtype=np.uint16)
        (out_dir / f"{split}.bin").write_bytes(ids.tobytes())
        meta["tokens"][split] = len(ids)
        meta["max_token"] = max(meta["max_token"], int(ids.max(initial=0)))
    meta.update(status="done", stopped_by="end of source", documents=len(SPLITS))
    write_json_atomic(out_dir / "meta.json", meta)
    return meta


def _settings(dataset: str, source: str, token_budget: int, holdout_every: int) -> dict[str, Any]:
    """Everything that decides the shards' contents: a change means the old shards are not these."""
    return {"dataset": dataset, "source": source, "tokenizer": NAME, "dtype": DTYPE,
            "token_budget": token_budget, "holdout_every": holdout_every}


def _fresh_meta(settings: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "dataset": settings["dataset"], "settings": settings, "tokenizer": NAME,
            "vocab_size": VOCAB, "eot": EOT, "dtype": DTYPE, "status": "partial", "stopped_by": None,
            "documents": 0, "tokens": dict.fromkeys(SPLITS, 0), "max_token": 0}


# ---------------------------------------------------------------- the pipeline


def _encode(text: str) -> np.ndarray:
    # encode_ordinary: a literal "<|endoftext|>" inside a document is text, never a separator
    return np.asarray(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


def _init_worker() -> None:
    gpt2_encoding()  # build the encoding once per worker, not once per document


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: start over


def _start(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The meta to continue from: the old one if it is the same preparation, else a fresh one.

    A changed token budget keeps what is written when the new budget still covers it: a larger
    budget extends the shards (the one document clipped at the old budget is not completed).
    """
    old = _read_meta(out_dir / "meta.json")
    if old and old.get("format") == FORMAT and _resumable(out_dir, old, settings):
        for split in SPLITS:  # drop anything appended after the last commit
            os.truncate(out_dir / f"{split}.bin", old["tokens"][split] * 2)
        if old["settings"] != settings and old["stopped_by"] != "end of source":
            old.update(status="partial", stopped_by=None)
        old["settings"] = settings
        return old
    for split in SPLITS:
        (out_dir / f"{split}.bin").unlink(missing_ok=True)
    return _fresh_meta(settings)


def _resumable(out_dir: Path, old: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Same source and tokenizer, a budget that covers what is written, and no shard shorter than recorded."""
    if {**old["settings"], "token_budget": 0} != {**settings, "token_budget": 0}:
        return False
    if settings["token_budget"] < sum(old["tokens"].values()):
        return False
    for split in SPLITS:
        path = out_dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size < old["tokens"][split] * 2:
            return False  # lost data cannot be resumed: start over
    return True


def _route(index: int, row: Row, holdout_every: int) -> str:
    if row.get("split") in SPLITS:
        return row["split"]
    slot = index % holdout_every
    return "val" if slot == holdout_every - 2 else "test" if slot == holdout_every - 1 else "train"


def _texts(rows: list[Row], first: int) -> list[str]:
    texts = []
    for i, row in enumerate(rows, first):
        text = row.get("text") if isinstance(row, Mapping) else None
        if not isinstance(text, str):
            raise HarnessError(f"row {i} of the source has no 'text' string field (got {type(row).__name__}); "
                               f"a GPT-2 source yields rows like {{'text': ...}}")
        texts.append(text)
    return texts


def prepare_rows(rows: Iterable[Row], out_dir: Path, *, dataset: str, source: str, token_budget: int,
                 workers: int = 0, chunk_docs: int = CHUNK_DOCS, holdout_every: int = HOLDOUT_EVERY) -> dict[str, Any]:
    """Tokenize ``rows`` into out_dir/{train,val,test}.bin, resuming a matching unfinished run; returns meta.

    ``workers`` > 1 tokenizes in that many processes (0 or 1: in this process).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(dataset, source, token_budget, holdout_every)
    meta = _start(out_dir, settings)
    if meta["status"] == "done":
        return meta
    meta_path = out_dir / "meta.json"
    write_json_atomic(meta_path, meta)  # "partial" on disk before any shard changes
    stream = itertools.islice(iter(rows), meta["documents"], None)  # skip what is already written
    pool = multiprocessing.Pool(workers, initializer=_init_worker) if workers > 1 else None
    try:
        files = {split: (out_dir / f"{split}.bin").open("ab") for split in SPLITS}
        try:
            while meta["stopped_by"] is None:
                if sum(meta["tokens"].values()) >= token_budget:
                    meta["stopped_by"] = "token budget"
                    break
                chunk = list(itertools.islice(stream, chunk_docs))
                if not chunk:
                    meta["stopped_by"] = "end of source"
                    break
                texts = _texts(chunk, meta["documents"])
                encoded = pool.map(_encode, texts, chunksize=16) if pool else [_encode(t) for t in texts]
                _commit(meta, chunk, encoded, files, holdout_every)
                write_json_atomic(meta_path, meta)
        finally:
            for f in files.values():
                f.close()
    finally:
        if pool:
            pool.terminate()
    meta["status"] = "done"
    write_json_atomic(meta_path, meta)
    return meta


def _commit(meta: dict[str, Any], chunk: list[Row], encoded: list[np.ndarray], files: dict[str, Any],
            holdout_every: int) -> None:
    """Append one chunk's documents (each after an EOT), clipped at the budget; fsync before meta says so."""
    budget = meta["settings"]["token_budget"]
    eot = np.array([EOT], dtype=np.uint16)
    for row, ids in zip(chunk, encoded, strict=True):
        left = budget - sum(meta["tokens"].values())
        doc = np.concatenate([eot, ids])[:left]
        split = _route(meta["documents"], row, holdout_every)
        files[split].write(doc.tobytes())
        meta["tokens"][split] += len(doc)
        meta["max_token"] = max(meta["max_token"], int(doc.max()))
        meta["documents"] += 1
        if len(doc) == left:
            meta["stopped_by"] = "token budget"
            break
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
