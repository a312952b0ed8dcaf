"""CIFAR-10 and CIFAR-100 read from the official python-pickle batch files.

Layout (what the official archives extract to, under <data_dir>/cifar10 or /cifar100):
``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``; ``cifar-100-python/train``
and ``test``. Each file is a pickled dict: b"data" a uint8 array N x 3072 (the red,
green and blue 32x32 planes, row-major) and b"labels" (CIFAR-10) or b"fine_labels"
(CIFAR-100), a list of ints. The files are unpickled with a restricted unpickler
that resolves only the three numpy globals an array needs, so a tampered file
cannot run code. Images stay uint8 (N, 3, 32, 32) in memory, a quarter of float32;
batches are augmented and normalised as they are cut (see ``normalize``, ``augment``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.errors import DataMissingError, HarnessError
from lib.train.classification import Split, SplitData

# Fixed and independent of the run seed: every run holds out the same validation images.
SPLIT_SEED = 1998
VAL_IMAGES = 5000
PREPARE_HINT = "run `make prepare-data` (needs the network once)"
REFETCH_HINT = PREPARE_HINT + " to fetch it again"
PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one dataset's files live, what they hold, and its published archive."""

    name: str
    folder: str  # the folder the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    classes: int
    archive: str
    md5: str  # published on https://www.cs.toronto.edu/~kriz/cifar.html
    mean: tuple[float, float, float]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, float, float]


CIFAR: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        b"labels", 10, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarLayout(
        "cifar100", "cifar-100-python", ("train",), ("test",),
        b"fine_labels", 100, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}


def layout_of(name: str) -> CifarLayout:
    """The layout of dataset ``name``; HarnessError naming the valid ones if unknown."""
    if name not in CIFAR:
        raise HarnessError(f"unknown CIFAR dataset {name!r}; choose one of: {', '.join(CIFAR)}")
    return CIFAR[name]


CifarData = SplitData  # the shared container (lib/train/classification.py)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- safe unpickling

# np.ndarray's own pickle constructor, whatever module this numpy version keeps it in.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name in the official files (numpy 1)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name numpy 2 writes
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, ints, bytes and numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name} (a CIFAR batch holds only arrays, lists and bytes)"
            ) from None


def _check_batch(obj: Any, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels N x 3072 uint8, labels N int64) from an unpickled batch; ValueError saying why not."""
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        raise ValueError(f"expected a dict with keys b'data' and {label_key!r}")
    data, labels = obj[b"data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise ValueError(f"b'data' is not a uint8 array N x {PIXELS}")
    if not isinstance(labels, list) or len(labels) != len(data) or any(type(y) is not int for y in labels):
        raise ValueError(f"{label_key!r} is not a list of {len(data)} ints")
    array = np.asarray(labels, dtype=np.int64)
    if array.size and not 0 <= array.min() <= array.max() < classes:
        raise ValueError(f"labels outside 0..{classes - 1}")
    return data, array


def read_batch(path: Path, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file as (pixels N x 3072 uint8, labels N int64).

    DataMissingError (one line naming the file) if it is missing, truncated, not a
    CIFAR batch, or references anything but numpy's array constructors.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
        return _check_batch(obj, label_key, classes)
    except FileNotFoundError:
        raise DataMissingError(f"{path}: missing; {PREPARE_HINT}") from None
    except Exception as exc:  # a damaged pickle fails in many ways: EOFError, ValueError, UnpicklingError, ...
        raise DataMissingError(f"{path}: not a valid CIFAR batch file ({_one_line(exc)}); {REFETCH_HINT}") from None


def _read_files(folder: Path, names: tuple[str, ...], layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_batch(folder / name, layout.label_key, layout.classes) for name in names]
    # concatenate copies, so the arrays own writable memory (the unpickled ones may not)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def is_complete(root: Path, layout: CifarLayout) -> bool:
    """True if every batch file of ``layout`` under ``root`` reads as a valid CIFAR batch."""
    try:
        _read_files(Path(root) / layout.folder, layout.train_files + layout.test_files, layout)
    except DataMissingError:
        return False
    return True


# ---------------------------------------------------------------- splits


def stratified_holdout(labels: np.ndarray, count: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) index arrays; ``val`` holds ``count`` images, the same share of every class.

    Each image gets its rank within its class after a fixed shuffle, as a fraction
    of the class size; the ``count`` smallest fractions form the validation set.
    With CIFAR's equal classes, 5,000 of 50,000 is exactly 500 per CIFAR-10 class
    and 50 per CIFAR-100 class; any other count stays as even as it can be.
    """
    n = len(labels)
    if not 0 < count < n:
        raise HarnessError(f"cannot hold out {count} validation images of the {n} training images; "
                           f"set CONFIG_RESNET_VAL_IMAGES between 1 and {n - 1}")
    rng = np.random.default_rng(seed)
    position = np.empty(n)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        position[idx] = rng.permutation(len(idx)) / len(idx)
    order = np.argsort(position, kind="stable")
    return np.sort(order[count:]), np.sort(order[:count])


def _split(pixels: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None) -> Split:
    if index is not None:
        pixels, labels = pixels[index], labels[index]
    images = torch.from_numpy(np.ascontiguousarray(pixels).reshape(-1, 3, 32, 32))
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def load_cifar(root: Path, name: str, val_count: int = VAL_IMAGES, split_seed: int = SPLIT_SEED) -> CifarData:
    """CIFAR ``name`` from ``root`` (<data_dir>/<name>); ``val_count`` training images are held out."""
    layout = layout_of(name)
    folder = Path(root) / layout.folder
    missing = [f for f in layout.train_files + layout.test_files if not (folder / f).is_file()]
    if missing:
        raise DataMissingError(f"{layout.name} not found in {folder} (missing {', '.join(missing)}); {PREPARE_HINT}")
    train_px, train_y = _read_files(folder, layout.train_files, layout)
    test_px, test_y = _read_files(folder, layout.test_files, layout)
    train, val = stratified_holdout(train_y, val_count, split_seed)
    return CifarData(_split(train_px, train_y, train), _split(train_px, train_y, val), _split(test_px, test_y))


# ---------------------------------------------------------------- per-batch transforms


def normalize(images: torch.Tensor, layout: CifarLayout) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32 scaled to [0, 1], minus the channel mean, over the std."""
    mean = torch.tensor(layout.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(layout.std, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean).div_(std)


def augment_draws(n: int, generator: torch.Generator, pad: int = 4) -> tuple[torch.Tensor, ...]:
    """The random numbers ``augment`` takes for ``n`` images: row and column offsets, flips. A stream that
    seeks (resnet/task.py) draws them for the batches it skips, and reads no image."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return dy, dx, torch.rand(n, generator=generator) < 0.5


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation, per image: a random 32x32 crop of the image zero-padded by
    ``pad`` pixels, then a horizontal flip with probability 1/2. Same dtype and shape out.

    Done as one gather over the padded batch (no per-image Python loop); the random
    numbers come only from ``generator``, so a seed fixes every crop and flip.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))  # zero = black, as torchvision's RandomCrop(padding=4)
    dy, dx, flip = augment_draws(n, generator, pad)
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the crop's columns right to left
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
