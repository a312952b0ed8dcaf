"""Provenance (issue 23, item 1): every run's summary.json and its report.md header say what made it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lenet5.data import load_mnist5k
from lib import matrix
from lib.core import provenance
from lib.core.provenance import tensors_sha256
from lib.core.pyenv import normalise
from lib.train import run as run_mod
from lib.train.classification import fingerprint
from tests.conftest import ROOT, tiny_spec


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with one tiny LeNet-5 run, summarised and reported as `make` does."""
    spec = tiny_spec("lenet5_adamw_none_0", max_iters=4)
    out = matrix.new_results_folder(str(tmp_path_factory.mktemp("prov")), "p", [spec], "make (test)", "")
    assert run_mod.run(out / spec.name) == 0
    matrix.write_summary(out)
    return out


def run_provenance(folder: Path) -> dict:
    return json.loads((folder / "lenet5_adamw_none_0" / "summary.json").read_text())["provenance"]


def test_the_summary_names_the_commit_and_whether_the_tree_was_dirty(folder: Path) -> None:
    p = run_provenance(folder)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    assert p["commit"] == head and len(head) == 40 and p["dirty"] is dirty


def test_the_summary_names_the_software_and_the_machine(folder: Path) -> None:
    p = run_provenance(folder)
    v = p["versions"]
    assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__
    for dist in ("kconfiglib", "safetensors", "tiktoken", "torch-pruning", "submitit"):  # the pinned ones
        assert v[normalise(dist)] == importlib.metadata.version(dist), dist
    assert p["device"] == provenance.device_name("cpu") and p["device"]
    assert p["threads"] == 1 and p["world_size"] == 1  # tiny_spec plans one thread


def test_the_summary_fingerprints_the_data_actually_used(folder: Path) -> None:
    data = run_provenance(folder)["data"]
    splits = load_mnist5k()
    assert data == {"source": "mnist5k", **{f"{s}_sha256": tensors_sha256(splits.split(s).images,
                                                                          splits.split(s).labels)
                                           for s in ("train", "val", "test")}}
    other = fingerprint(load_mnist5k(split_seed=12345), "mnist5k")
    assert other["train_sha256"] != data["train_sha256"]  # another split of the same digits: another hash
    zero = torch.zeros(4, dtype=torch.int32)  # the same 16 bytes three ways: dtype and shape count too
    assert len({tensors_sha256(zero), tensors_sha256(zero.float()), tensors_sha256(zero.view(2, 2))}) == 3


def test_the_report_header_carries_the_provenance(folder: Path) -> None:
    p = run_provenance(folder)
    report = (folder / "report.md").read_text().splitlines()[:12]
    assert any(line.startswith(f"Commit: {p['commit'][:12]}") for line in report), report
    assert any(line.startswith(f"Software: python {p['versions']['python']}, torch {torch.__version__}")
               for line in report)
    assert any(line.startswith(f"Device: {p['device']}, 1 thread(s), world size 1") for line in report)
    assert any(line.startswith(f"Data: mnist5k train {p['data']['train_sha256'][:12]}") for line in report)


def test_a_published_folder_made_before_provenance_says_so() -> None:
    from lib.results.report import render

    text = render(ROOT / "key_results" / "2026-12-02_lenet5-all-methods-released-spam")
    assert "Provenance: not recorded (runs made before provenance was kept)" in text


def test_token_files_are_fingerprinted_by_their_sha256(tmp_path: Path) -> None:
    from gpt2.task import GPT2Task
    from tests.conftest import synthetic_spec

    spec = synthetic_spec(tmp_path)
    found = GPT2Task().data_fingerprint(spec)
    root = tmp_path / "data" / "gpt2" / "text"
    for split in ("train", "val", "test"):
        assert found[f"{split}_sha256"] == hashlib.sha256((root / f"{split}.bin").read_bytes()).hexdigest()
    assert found["source"]


def test_publish_copies_provenance_and_records_and_indexes_itself(folder: Path, tmp_path: Path) -> None:
    from lib.results.publish import INDEX_START, publish

    work = tmp_path / "results" / folder.name
    shutil.copytree(folder, work)
    run = work / "lenet5_adamw_none_0"
    records = ("sweep/sweep.json", "sweep/sweep.md", "surgery.json", "eval/lm_eval.json", "export/v1/model_card.json",
               "export/v2/model_card.json", "export/latest")
    for name in records:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}\n")
    for name in ("export/v1/model.safetensors", "export/v2/model.compressed.safetensors", "export/v2/hf/x.bin"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"weights")
    matrix_json = json.loads((work / "matrix.json").read_text())
    summary = json.loads((work / "summary.json").read_text())
    summary["command"] = matrix_json["command"] = f"make ONLY=\"lenet5_*\" RESULTS_DIR={tmp_path}/results MAX_ITERS=4"
    (work / "summary.json").write_text(json.dumps(summary))
    root = tmp_path / "key_results"
    root.mkdir()
    (root / "README.md").write_text("# Key results\n\nIntro.\n\n## Status\n\nHand-written notes.\n")
    dest = publish(work, "prov-test", dest_root=root, date="2026-12-06")
    published = dest / "lenet5_adamw_none_0"
    for name in records:
        assert (published / name).is_file(), name
    assert not [p for p in (published / "export").rglob("*") if p.is_file() and p.name not in ("model_card.json",
                                                                                                 "latest")]
    assert not list(dest.rglob("*.pt")) and not list(dest.rglob("*.safetensors"))
    assert json.loads((published / "summary.json").read_text())["provenance"] == run_provenance(folder)
    readme = (root / "README.md").read_text()
    assert readme.index("## Index") < readme.index(INDEX_START) < readme.index("## Status")
    assert "Hand-written notes." in readme
    commit = run_provenance(folder)["commit"][:7]
    row = next(line for line in readme.splitlines() if line.startswith("| [prov-test]"))
    assert "| 2026-12-06 |" in row and f"| {commit}" in row and '`make ONLY="lenet5_*" MAX_ITERS=4`' in row, row
    assert str(tmp_path) not in readme
    assert "1 of 1 runs ok; best by val: lenet5_adamw_none_0" in row
    publish(work, "prov-test-2", dest_root=root, date="2026-12-07")  # the index is rewritten, not appended
    readme = (root / "README.md").read_text()
    assert readme.count(INDEX_START) == 1 and readme.count("| [prov-test") == 2
