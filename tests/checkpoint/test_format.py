"""The checkpoint file format and the training-checkpoint manager, in-process: damaged files refused in one
line, fallback past a damaged newest one, keep-last and milestones, a failing writer, another run's checkpoint."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lib.checkpoint import CheckpointError, load, save
from lib.checkpoint.manager import Manager, Policy
from lib.core.files import DiskFullError


def test_damaged_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "step_00000004.ckpt"
    save(path, {"w": torch.arange(1000.0), "step": 4})
    data = path.read_bytes()
    for damage, message in ((data[: len(data) // 2], "is truncated"),
                            (data[:200] + bytes([data[200] ^ 1]) + data[201:], "fails its SHA-256 check")):
        path.write_bytes(damage)
        with pytest.raises(CheckpointError, match=message) as caught:
            load(path)
        assert "\n" not in str(caught.value)


def test_a_verified_file_that_is_not_a_torch_payload_is_one_line(tmp_path):
    import hashlib

    from lib.checkpoint.format import MAGIC
    from lib.core.errors import first_line

    path, data = tmp_path / "odd.ckpt", b"not a torch file at all"
    path.write_bytes(data + MAGIC + f"{len(data):020d}".encode() + hashlib.sha256(data).hexdigest().encode() + b"\n")
    with pytest.raises(CheckpointError, match=f"refused to load {path}") as caught:
        load(path)
    assert "\n" not in str(caught.value)
    assert first_line(ValueError()) == "ValueError" and first_line(ValueError("a\nb")) == "a"


def test_a_pickled_code_object_is_refused(tmp_path):
    from lib.checkpoint.format import load_payload

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "hook": os.system}, evil)
    with pytest.raises(CheckpointError, match=r"refused to load .* pickled objects beyond tensors.*posix.system"):
        load_payload(evil, evil)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    said = []
    manager = Manager(tmp_path, Policy(interval=1, keep_last=3), say=said.append)
    for step in (1, 2, 3):
        manager.save(step, {"step": step})
    newest = tmp_path / "step_00000003.ckpt"
    newest.write_bytes(newest.read_bytes()[:-5])
    path, payload = manager.latest()
    assert payload["step"] == 2 and path.name == "step_00000002.ckpt"
    assert len(said) == 1 and "step_00000003.ckpt is truncated" in said[0] and "trying the one before" in said[0]
    for p in manager.steps():
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*move that folder away"):
        manager.latest()


def test_keep_last_and_milestones(tmp_path):
    manager = Manager(tmp_path, Policy(interval=1, keep_last=2, milestone_every=3))
    for step in range(1, 8):
        manager.save(step, {"step": step})
    assert [p.name for p in manager.steps()] == ["step_00000006.ckpt", "step_00000007.ckpt"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000007.ckpt"
    assert sorted(p.name for p in (tmp_path / "milestones").iterdir()) == ["step_00000003.ckpt",
                                                                         "step_00000006.ckpt"]
    with pytest.raises(CheckpointError, match="keep at least 1"):
        Policy(keep_last=0)


def test_a_failing_writer_leaves_latest_unchanged(tmp_path, monkeypatch):
    import errno

    manager = Manager(tmp_path, Policy(interval=1, keep_last=3))
    manager.save(1, {"step": 1, "w": torch.zeros(10)})

    def full(obj, f, *args, **kwargs):  # torch.save writes the temporary file by its path
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"disk full writing .*step_00000002.ckpt \("):
        manager.save(2, {"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_00000001.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001.ckpt"]
    assert manager.latest()[1]["step"] == 1


def test_keep_last_zero_in_config_is_one_line(make_config):
    from lib import config
    from lib.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"CONFIG_CKPT_KEEP_LAST=0 is outside its range \[1, 1000\]"):
        config.load(make_config("", "CONFIG_CKPT_KEEP_LAST=0\n"))
    with pytest.raises(ConfigError, match="CONFIG_CKPT_TIME='5' has no unit"):
        config.load(make_config("", 'CONFIG_CKPT_TIME="5"\n'))


def test_continue_without_spec_json_is_one_line(tmp_path):
    from lib import matrix
    from lib.core.errors import HarnessError

    folder = tmp_path / "t_20250101_000000"
    (folder / "run0").mkdir(parents=True)
    (folder / "matrix.json").write_text(json.dumps({"created": "2025-01-01T00:00:00", "runs": ["run0"]}))
    with pytest.raises(HarnessError, match=r"run0/spec.json is missing, so that run cannot be \(re\)started"):
        matrix.run_folder(folder, 1, only_unfinished=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_format_2_hashes_blocks_and_format_1_files_still_load(tmp_path, monkeypatch):
    """Format 2's digest is the SHA-256 of its blocks' SHA-256s (hashed on two threads when saving); a block
    damaged anywhere is caught; a file written with format 1's trailer (one SHA-256) loads as before."""
    import hashlib
    import io

    from lib.checkpoint import format as fmt

    monkeypatch.setattr(fmt, "BLOCK", 4096)  # a 40 kB payload is then 10 blocks
    path = tmp_path / "v2.ckpt"
    save(path, {"w": torch.arange(10_000.0), "step": 2})
    data = path.read_bytes()
    payload, trailer = data[:-fmt.TRAILER], data[-fmt.TRAILER:]
    assert trailer.startswith(fmt.MAGIC2) and len(payload) > 8 * 4096
    blocks = b"".join(hashlib.sha256(payload[i:i + 4096]).digest() for i in range(0, len(payload), 4096))
    assert trailer[len(fmt.MAGIC) + 20:-1].decode() == hashlib.sha256(blocks).hexdigest()
    assert torch.equal(load(path)["w"], torch.arange(10_000.0))
    damaged = bytearray(data)
    damaged[5 * 4096 + 7] ^= 1  # inside the sixth block
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        load(path)
    old = tmp_path / "v1.ckpt"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3), "step": 1}, buffer)
    body = buffer.getvalue()
    old.write_bytes(body + fmt.MAGIC + f"{len(body):020d}".encode() + hashlib.sha256(body).hexdigest().encode() + b"\n")
    assert load(old)["step"] == 1
