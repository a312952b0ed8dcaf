"""ResNet data: CIFAR pickle files, safe unpickling, stratified hold-out, augmentation, downloader."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.errors import DataMissingError, HarnessError
from resnet.data import CIFAR, augment, layout_of, load_cifar, normalize, read_batch, stratified_holdout
from resnet.download import download_cifar

# ---------------------------------------------------------------- tiny CIFAR files in the official format


def write_batch(path: Path, pixels: np.ndarray, labels: list[int], label_key: bytes) -> None:
    """A batch file as the official archives hold it: a pickled dict of bytes keys, array and lists."""
    batch = {b"batch_label": b"tiny batch", label_key: labels, b"data": pixels,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [y // 5 for y in labels]
    raw = pickle.dumps(batch, protocol=3)
    # the official files name numpy's array constructor as numpy 1 did
    raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(raw)


def write_tiny_cifar(root: Path, which: str, per_file: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """Random images under root/<folder>; label of train image i is i % classes. Returns what was written."""
    layout = layout_of(which)
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_train = per_file * (10 if which == "cifar100" else 1)
    written: dict[str, list] = {"train_px": [], "train_y": []}
    for k, name in enumerate(layout.train_files):
        px = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
        ys = [(k * n_train + i) % layout.classes for i in range(n_train)]
        write_batch(folder / name, px, ys, layout.label_key)
        written["train_px"].append(px)
        written["train_y"] += ys
    test_px = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    write_batch(folder / layout.test_files[0], test_px, [i % layout.classes for i in range(n_test)],
                layout.label_key)
    return {"train_px": np.concatenate(written["train_px"]), "train_y": np.array(written["train_y"]),
            "test_px": test_px}


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_tiny_cifar(tmp_path / "cifar10", "cifar10")


# ---------------------------------------------------------------- pickle files and splits


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_round_trip(tmp_path: Path, which: str) -> None:
    written = write_tiny_cifar(tmp_path, which)
    n_train = len(written["train_y"])
    val_count = CIFAR[which].classes  # one per class
    data = load_cifar(tmp_path, which, val_count=val_count)
    assert (len(data.train), len(data.val), len(data.test)) == (n_train - val_count, val_count, 10)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert torch.equal(data.test.images.reshape(10, -1), torch.from_numpy(written["test_px"]))
    rows = {bytes(r): y for r, y in zip(written["train_px"], written["train_y"], strict=True)}
    for split in (data.train, data.val):  # every image keeps its own label
        for image, label in zip(split.images.reshape(len(split), -1).numpy(), split.labels.tolist(), strict=True):
            assert rows[bytes(image)] == label
    assert sorted(data.val.labels.tolist()) == list(range(CIFAR[which].classes))


def test_stratified_holdout_is_exact_fixed_and_a_partition() -> None:
    for classes, per_class in ((10, 500), (100, 50)):
        labels = np.repeat(np.arange(classes), 50000 // classes)
        train, val = stratified_holdout(labels, 5000)
        assert np.bincount(labels[val], minlength=classes).tolist() == [per_class] * classes
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(50000))
        assert np.array_equal(val, stratified_holdout(labels, 5000)[1])
        assert not np.array_equal(val, stratified_holdout(labels, 5000, seed=1)[1])
    counts = np.bincount(np.repeat(np.arange(10), 7)[stratified_holdout(np.repeat(np.arange(10), 7), 25)[1]])
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1
    with pytest.raises(HarnessError, match="cannot hold out 70"):
        stratified_holdout(np.repeat(np.arange(10), 7), 70)


def _bad_pickle(path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a valid CIFAR batch"),
    (lambda p: p.write_bytes(b"<html>not found</html>"), "not a valid CIFAR batch"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0, 1]})), "uint8 array"),
    (_bad_pickle, "refused to load global"),
])
def test_damaged_or_malicious_pickle_is_one_line(cifar10, damage, reason) -> None:
    root, _ = cifar10
    path = root / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    damage(path)
    with pytest.raises(DataMissingError, match=reason) as err:
        load_cifar(root / "cifar10", "cifar10", val_count=20)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "make prepare-data" in message
    assert not (path.parent / "pwned").exists()



def test_missing_data_names_make_prepare_data(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="make prepare-data") as err:
        load_cifar(tmp_path / "cifar100", "cifar100")
    assert "cifar-100-python" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataMissingError, match="missing"):
        read_batch(tmp_path / "nope", b"labels", 10)


# ---------------------------------------------------------------- augmentation and batches


def test_augment_is_a_seeded_padded_crop_with_flips() -> None:
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding shows up
    out = augment(images, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, augment(images, torch.Generator().manual_seed(6)))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = shifts = 0
    for image, window in zip(padded, out, strict=True):  # each output is some window of its padded image
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(window, image[:, dy:dy + 32, dx:dx + 32].flip(-1) if f else
                                image[:, dy:dy + 32, dx:dx + 32])]
        assert found
        flips += found[0][2]
        shifts += (found[0][0], found[0][1]) != (4, 4)
    assert 16 < flips < 48 and shifts > 48  # about half flipped; most shifted


def test_normalize_uses_the_channel_statistics() -> None:
    layout = layout_of("cifar10")
    black = normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), layout)
    expected = [-m / s for m, s in zip(layout.mean, layout.std, strict=True)]
    assert black.dtype == torch.float32 and black[0, :, 0, 0].tolist() == pytest.approx(expected)


# ---------------------------------------------------------------- downloader


class FakeOpener:
    """Serves bytes per URL like urlopen; unknown URLs fail like an unreachable host."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.calls = files, []

    def __call__(self, url: str, timeout: float = 0) -> io.BytesIO:
        self.calls.append(url)
        if url not in self.files:
            raise urllib.error.URLError(f"cannot reach {url}")
        return io.BytesIO(self.files[url])


def tar_gz(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def tiny_archive(tmp_path: Path, which: str) -> bytes:
    write_tiny_cifar(tmp_path / "src", which)
    folder = tmp_path / "src" / layout_of(which).folder
    return tar_gz({f"{folder.name}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_download_verifies_extracts_then_skips(tmp_path: Path, which: str) -> None:
    archive = tiny_archive(tmp_path, which)
    name = layout_of(which).archive
    opener = FakeOpener({"https://bad.example/" + name: archive[:-50], "https://good.example/" + name: archive})
    dest = tmp_path / "data" / which
    urls = ["https://down.example", "https://bad.example/", "https://good.example/"]
    assert download_cifar(which, dest, urls, opener=opener, expected_md5=_md5(archive)) is True
    assert [p.name for p in dest.iterdir()] == [layout_of(which).folder]  # no .part, no staging left
    val = layout_of(which).classes
    assert len(load_cifar(dest, which, val_count=val).test) == 10
    assert download_cifar(which, dest, urls, opener=opener, expected_md5=_md5(archive)) is False
    assert len(opener.calls) == 3
    damaged = dest / layout_of(which).folder / layout_of(which).test_files[0]
    damaged.write_bytes(damaged.read_bytes()[:-9])  # a damaged copy is replaced as a whole
    assert download_cifar(which, dest, urls[2:], opener=opener, expected_md5=_md5(archive)) is True
    assert len(load_cifar(dest, which, val_count=val).test) == 10 and len(opener.calls) == 4


def test_download_refuses_a_wrong_md5(tmp_path: Path) -> None:
    archive = tiny_archive(tmp_path, "cifar10")
    opener = FakeOpener({"https://a.example/cifar-10-python.tar.gz": archive})
    with pytest.raises(HarnessError, match="MD5 .* expected c58f30108f718f92721af3b95e74349a") as err:
        download_cifar("cifar10", tmp_path / "out", ["https://a.example/"], opener=opener)  # the published MD5
    assert "\n" not in str(err.value) and "network" in str(err.value)
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("members, symlink", [
    ({"cifar-10-batches-py/../../evil.txt": b"x"}, None),
    ({"/tmp/evil.txt": b"x"}, None),
    ({"elsewhere/evil.txt": b"x"}, None),
    ({}, "cifar-10-batches-py/data_batch_1"),
])
def test_download_refuses_unsafe_archive_members(tmp_path: Path, members: dict, symlink: str | None) -> None:
    archive = tar_gz(members, symlink)
    opener = FakeOpener({"https://a.example/cifar-10-python.tar.gz": archive})
    dest = tmp_path / "a" / "b"
    with pytest.raises(HarnessError, match="refusing archive member"):
        download_cifar("cifar10", dest, ["https://a.example/"], opener=opener, expected_md5=_md5(archive))
    assert not list(dest.iterdir()) and not (tmp_path / "evil.txt").exists()
