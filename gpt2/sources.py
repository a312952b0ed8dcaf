"""Where GPT-2's text comes from: each dataset as a stream of rows ``{"text": ...}``.

A row may also name its ``"split"``; rows without one are routed by position in
gpt2/prepare.py (one in HOLDOUT_EVERY to val, one to test). Few-document corpora
(Shakespeare, a text folder, the Python help topics) are cut 90/5/5 inside each
document instead, so every split gets text. Only ``finewebedu_rows`` and
``shakespeare_rows`` touch the network, and only when iterated / called.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lib.core.errors import DataMissingError, HarnessError

SPLITS = ("train", "val", "test")
DATASETS = ("finewebedu", "shakespeare", "pydoc", "text")
FINEWEBEDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CUT_POINTS = (0.90, 0.95)  # few-document corpora: each document's first 90% trains, then 5% val, 5% test
DOWNLOAD_TIMEOUT_S = 60
Row = Mapping[str, Any]


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def cut_document(text: str) -> Iterator[dict[str, str]]:
    """One document as train/val/test parts, cut at the first line break after 90% and after 95%."""
    bounds = [0]
    for frac in CUT_POINTS:
        at = max(int(len(text) * frac), bounds[-1])
        newline = text.find("\n", at)
        bounds.append(newline + 1 if newline >= 0 else at)
    bounds.append(len(text))
    for split, start, end in zip(SPLITS, bounds, bounds[1:], strict=False):
        if text[start:end].strip():
            yield {"text": text[start:end], "split": split}


def finewebedu_rows() -> Iterator[Row]:
    """FineWebEdu sample-10BT streamed from the Hugging Face hub (needs the network)."""
    import datasets  # heavy, and only needed here

    repo, name = FINEWEBEDU
    try:
        yield from datasets.load_dataset(repo, name=name, split="train", streaming=True)
    except OSError as exc:  # requests/huggingface_hub connection and HTTP errors are OSErrors
        raise HarnessError(f"streaming {repo} ({name}) failed: {one_line(exc)}; `make prepare-data` needs the "
                           f"network, and running it again resumes where it stopped") from None


def rows_from_file(path: Path) -> Iterator[Row]:
    """Rows of a local .parquet or .jsonl file with a ``text`` column (e.g. a downloaded FineWebEdu shard)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield {"text": text}
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise HarnessError(f"{path}:{n}: not a JSON line ({one_line(exc)})") from None
    else:
        raise HarnessError(f"{path}: expected a .parquet or .jsonl file of rows with a 'text' field")


def shakespeare_rows(dest: Path, opener: Callable[..., Any] = urllib.request.urlopen) -> Iterator[Row]:
    """Tiny Shakespeare (one 1.1 MB file, downloaded once into ``dest``) cut into train/val/test."""
    path = dest / "input.txt"
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("input.txt.part")
        try:
            with opener(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:  # URLError and HTTPError are OSErrors
            tmp.unlink(missing_ok=True)
            raise HarnessError(f"could not download {SHAKESPEARE_URL} ({one_line(exc)}); `make prepare-data` "
                               f"needs the network (or save the file as {path})") from None
        tmp.replace(path)
    return cut_document(path.read_text(encoding="utf-8", errors="replace"))


def text_files(folder: Path) -> list[Path]:
    """The .txt files under ``folder`` (sorted, recursive); DataMissingError if there is no text."""
    hint = "put plain-text .txt files there or point CONFIG_GPT2_TEXT_DIR at a folder that has some"
    if not folder.is_dir():
        raise DataMissingError(f"text folder {folder} does not exist; {hint}")
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not any(p.read_bytes().strip() for p in files):
        raise DataMissingError(f"text folder {folder} has no text (no non-empty .txt file); {hint}")
    return files


def text_rows(folder: Path) -> Iterator[Row]:
    """Every .txt file under ``folder`` as one document, cut into train/val/test."""
    for path in text_files(folder):
        yield from cut_document(path.read_text(encoding="utf-8", errors="replace"))


def pydoc_rows() -> Iterator[Row]:
    """The Python reference's help topics (pydoc_data, shipped with CPython; PSF licence), one per document."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataMissingError("this Python has no pydoc_data.topics; choose CONFIG_GPT2_DATASET_TEXT "
                               "with a folder of .txt files instead") from None
    for name in sorted(topics):
        yield from cut_document(topics[name])


def source_of(dataset: str, text_dir: Path | None = None) -> str:
    """What a dataset is made from, recorded in meta.json so that a different source is noticed."""
    if dataset == "finewebedu":
        return ":".join(FINEWEBEDU)
    if dataset == "shakespeare":
        return SHAKESPEARE_URL
    if dataset == "pydoc":
        return f"pydoc_data.topics (Python {sys.version.split()[0]})"
    return str(text_dir)


def default_rows(dataset: str, dest: Path, text_dir: Path | None = None) -> Iterator[Row]:
    """The rows of ``dataset`` from its real source; a missing text folder fails here, before anything is written."""
    if dataset == "finewebedu":
        return finewebedu_rows()
    if dataset == "shakespeare":
        return shakespeare_rows(dest)
    if dataset == "pydoc":
        return pydoc_rows()
    if dataset == "text" and text_dir is not None:
        text_files(text_dir)
        return text_rows(text_dir)
    raise HarnessError(f"no row source for GPT-2 dataset {dataset!r} (text needs a folder); "
                       f"choose one of: {', '.join(DATASETS)}")
