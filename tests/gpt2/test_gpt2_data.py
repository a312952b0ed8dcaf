"""GPT-2 data: the real preparation code on local rows, budget, resume, shards, batches, and every bad input."""

from __future__ import annotations

import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2 import data, prepare, sources
from gpt2.prepare import prepare_rows, shard_dir, write_shards
from gpt2.task import TASK
from gpt2.tokenizer import EOT, gpt2_encoding
from lib.core.errors import ConfigError, DataMissingError, HarnessError
from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings

DOCS = [f"Document {i}: pruning weights of a transformer, take {i}.\nSecond line {i * 7}." for i in range(11)]
FINEWEB = sources.source_of("finewebedu")


def bins(folder: Path) -> dict[str, list[int]]:
    return {s: np.fromfile(folder / f"{s}.bin", dtype=np.uint16).tolist() for s in sources.SPLITS}


def expected_shards(docs: list[str], holdout_every: int) -> dict[str, list[int]]:
    enc = gpt2_encoding()
    out: dict[str, list[int]] = {s: [] for s in sources.SPLITS}
    for i, doc in enumerate(docs):
        slot = i % holdout_every
        split = "val" if slot == holdout_every - 2 else "test" if slot == holdout_every - 1 else "train"
        out[split] += [EOT] + enc.encode_ordinary(doc)
    return out


def fineweb(rows, out: Path, budget: int = 10**6, **kw) -> dict:
    """The real FineWebEdu preparation, fed local rows instead of the hub stream."""
    kw = {"holdout_every": 4, "chunk_docs": 3, **kw}
    return prepare_rows(rows, out, dataset="finewebedu", source=FINEWEB, token_budget=budget, **kw)


@pytest.fixture
def row_files(tmp_path: Path) -> tuple[Path, Path]:
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), parquet)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in DOCS))
    return parquet, jsonl


def test_finewebedu_prep_on_parquet_and_jsonl(row_files: tuple[Path, Path], tmp_path: Path) -> None:
    parquet, jsonl = row_files
    meta = fineweb(sources.rows_from_file(parquet), tmp_path / "a")
    expected = expected_shards(DOCS, 4)
    assert bins(tmp_path / "a") == expected  # EOT before every document, one in 4 to val, one to test
    assert meta["status"] == "done" and meta["stopped_by"] == "end of source" and meta["documents"] == len(DOCS)
    assert meta["tokens"] == {s: len(v) for s, v in expected.items()}
    assert (meta["tokenizer"], meta["dtype"], meta["eot"]) == ("gpt2", "uint16", 50256)
    fineweb(sources.rows_from_file(jsonl), tmp_path / "b", workers=2)  # a process pool gives the same bytes
    assert bins(tmp_path / "b") == expected


def test_token_budget_stops_exactly(tmp_path: Path) -> None:
    meta = fineweb([{"text": d} for d in DOCS], tmp_path, budget=40)
    assert sum(meta["tokens"].values()) == 40 and meta["stopped_by"] == "token budget"
    assert sum(len(v) for v in bins(tmp_path).values()) == 40
    assert meta["documents"] < len(DOCS)


def test_interrupted_preparation_resumes_to_the_same_shards(tmp_path: Path) -> None:
    def dies_after(n: int):
        for i, doc in enumerate(DOCS):
            if i == n:
                raise KeyboardInterrupt  # the user's Ctrl-C, or a dropped connection
            yield {"text": doc}

    with pytest.raises(KeyboardInterrupt):
        fineweb(dies_after(7), tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "partial" and meta["documents"] == 6  # two chunks of 3 committed
    with pytest.raises(DataMissingError, match="interrupted.*make prepare-data"):
        data.load_shards(tmp_path, dataset="finewebedu", source=FINEWEB, token_budget=10**6, vocab_size=50304,
                         block_size=4)
    with (tmp_path / "train.bin").open("ab") as f:
        f.write(b"\x01\x02\x03")  # half-written bytes after the last commit are dropped on resume
    seen = []
    meta = fineweb(({"text": d} for d in DOCS if not seen.append(d)), tmp_path)
    assert meta["status"] == "done" and bins(tmp_path) == expected_shards(DOCS, 4)
    assert len(seen) == len(DOCS)  # the committed rows were skipped, not tokenized again...
    assert meta["documents"] == len(DOCS)
    # ...and a finished preparation with the same settings is left alone
    assert fineweb(iter(()), tmp_path)["tokens"] == meta["tokens"]


def test_a_larger_budget_extends_and_a_smaller_one_starts_over(tmp_path: Path) -> None:
    rows = [{"text": d} for d in DOCS]
    first = fineweb(rows, tmp_path, budget=60)
    head = bins(tmp_path)
    fineweb(rows, tmp_path, budget=10**6)
    grown = bins(tmp_path)
    assert all(grown[s][:len(head[s])] == head[s] for s in head) and sum(map(len, grown.values())) > 60
    assert fineweb(rows, tmp_path, budget=50)["tokens"] != first["tokens"]
    assert sum(len(v) for v in bins(tmp_path).values()) == 50


def test_rows_without_text_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="row 1 of the source has no 'text' string field"):
        fineweb([{"text": "ok"}, {"body": "no"}], tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(HarnessError, match="bad.jsonl:2: not a JSON line"):
        list(sources.rows_from_file(bad))


def test_small_corpora_are_cut_90_5_5() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    parts = list(sources.cut_document(text))
    assert [p["split"] for p in parts] == ["train", "val", "test"] and "".join(p["text"] for p in parts) == text
    train, val, _ = (p["text"] for p in parts)
    assert len(train) >= 0.9 * len(text) and len(train + val) >= 0.95 * len(text)
    assert val.startswith("line 9") and parts[2]["text"].startswith("line 9")  # cut at line breaks
    topics = list(sources.pydoc_rows())
    assert {r["split"] for r in topics} == {"train", "val", "test"} and len(topics) > 100


def test_shakespeare_download_and_failure(tmp_path: Path) -> None:
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    rows = list(sources.shakespeare_rows(tmp_path, opener=lambda url, timeout: io.BytesIO(text.encode())))
    assert "".join(r["text"] for r in rows) == text and (tmp_path / "input.txt").read_text() == text

    def offline(url: str, timeout: float):
        raise urllib.error.URLError("no network")

    with pytest.raises(HarnessError, match="could not download .*needs the network") as info:
        sources.shakespeare_rows(tmp_path / "other", opener=offline)
    assert "\n" not in str(info.value) and not (tmp_path / "other" / "input.txt.part").exists()


def spec_for(tmp_path: Path, **options) -> RunSpec:
    opts = {"size": "tiny", "dataset": "text", "block_size": 8, "vocab_size": 50304, "token_budget": 10**6,
            "text_dir": str(tmp_path / "texts"), **options}
    return RunSpec(name="g", model="gpt2", seed=1, optim=OptimSettings("adamw", 1e-3, 0.0), prune=PruneSettings(),
                   train=TrainSettings(batch_size=4, eval_batches=5), hardware=HardwarePlan("cpu", 4, 1),
                   model_options=opts, data_dir=str(tmp_path / "data"))


def test_text_folder_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text("".join(f"The quick brown fox {i}.\n" for i in range(60)))
    (tmp_path / "texts" / "sub" / "b.txt").write_text("".join(f"Jumps over the lazy dog {i}.\n" for i in range(60)))
    spec = spec_for(tmp_path)
    message = TASK.fetch_data(spec, workers=0)
    assert "text ready in" in message and "end of source" in message
    TASK.prepare(spec)
    x, y = next(TASK.train_batches(spec, 4, seed=1))
    assert x.shape == y.shape == (4, 8) and TASK.samples_in((x, y)) == 32
    assert 0 < TASK.evaluate(TASK.build_model(spec), spec, "test")["loss"] < 20


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "text folder .*texts does not exist; put plain-text .txt files there"),
    (lambda d: (d.mkdir(), (d / "empty.txt").write_text(" \n")), "has no text"),
])
def test_text_folder_without_text_is_one_line(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "texts")
    with pytest.raises(DataMissingError, match=message) as info:
        TASK.fetch_data(spec_for(tmp_path), workers=0)
    assert "\n" not in str(info.value)


def synthetic(tmp_path: Path, n: int = 500, top: int = 99) -> Path:
    out = shard_dir(tmp_path / "data", "text")
    ids = {s: np.arange(n) % (top + 1) for s in sources.SPLITS}
    write_shards(out, ids, dataset="text", source=str(tmp_path / "texts"), token_budget=10**6)
    return out


def test_batches_are_windows_and_repeat_per_seed(tmp_path: Path) -> None:
    synthetic(tmp_path, n=5000, top=4999 % 65536)
    spec = spec_for(tmp_path)
    a, b, c = (TASK.train_batches(spec, 3, seed) for seed in (1, 1, 2))
    first = [next(a) for _ in range(3)]
    assert all(np.array_equal(x, x2) for (x, _), (x2, _) in zip(first, (next(b) for _ in range(3)), strict=True))
    assert not np.array_equal(first[0][0], next(c)[0])
    x, y = first[0]
    assert (y - x == 1).all()  # the shard counts up, so a window's target is its input shifted by one
    val1, val2 = (data.eval_windows(TASK._data(spec), "val", 8, 5) for _ in range(2))
    assert np.array_equal(val1[0], val2[0]) and val1[0].shape == (5, 8)
    test = data.eval_windows(TASK._data(spec), "test", 8, 5)[0]
    assert not np.array_equal(val1[0], test)  # val and test use different fixed windows


def _corrupt(tmp_path: Path, what: str) -> None:
    out = synthetic(tmp_path)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    if what == "missing":
        meta_path.unlink()
    elif what == "odd":
        with (out / "val.bin").open("ab") as f:
            f.write(b"\x00")
    elif what == "truncated":
        (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-20])
    elif what == "big-id":
        (out / "test.bin").write_bytes(np.full(500, 60000, dtype=np.uint16).tobytes())
    elif what == "tokenizer":
        meta["tokenizer"] = "cl100k_base"
    elif what == "budget":
        meta["settings"]["token_budget"] = 5
    elif what == "unreadable":
        meta_path.write_text("{not json")
    if what in ("tokenizer", "budget"):
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("what, options, message", [
    ("missing", {}, r"GPT-2 dataset 'text' is not prepared .*run `make prepare-data` to prepare GPT-2 dataset 'text'"),
    ("odd", {}, "val.bin: 1001 bytes is not a whole number of uint16 tokens"),
    ("truncated", {}, "train.bin holds 490 tokens but meta.json says 500"),
    ("big-id", {}, "test.bin has token id 60000 but the model's vocabulary is 50304"),
    ("none", {"vocab_size": 64}, "has token id 99 but the model's vocabulary is 64 .CONFIG_GPT2_VOCAB_SIZE"),
    ("tokenizer", {}, "meta.json says format/tokenizer/dtype/eot .*cl100k_base"),
    ("budget", {}, "was prepared with token_budget 5 .config: 1000000."),
    ("none", {"text_dir": "/elsewhere"}, "was prepared with source .*config: '/elsewhere'"),
    ("unreadable", {}, "meta.json is unreadable"),
    ("none", {"block_size": 500}, "holds 500 tokens, fewer than one window of CONFIG_GPT2_BLOCK_SIZE \\+ 1 = 501"),
])
def test_bad_shards_are_one_clear_line(tmp_path: Path, what: str, options: dict, message: str) -> None:
    _corrupt(tmp_path, what)
    with pytest.raises(DataMissingError, match=message) as info:
        TASK.prepare(spec_for(tmp_path, **options))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options, message", [
    ({"size": "2b"}, "unknown GPT-2 size '2b'"),
    ({"dataset": "wiki"}, "unknown GPT-2 dataset 'wiki'"),
    ({"text_dir": ""}, "CONFIG_GPT2_TEXT_DIR is empty"),
])
def test_bad_options_are_config_errors(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TASK.prepare(spec_for(tmp_path, **options))


def test_prepare_dataset_uses_the_real_source_by_default(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="does not exist"):
        prepare.prepare_dataset("text", tmp_path / "out", source="x", token_budget=100, text_dir=tmp_path / "none")
    assert not (tmp_path / "out" / "meta.json").exists()  # nothing written before the source is checked


def test_finewebedu_stream_failure_is_one_line_and_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def dropped(path: str, **kwargs):  # the hub stream: two rows, then the connection drops
        calls.append((path, kwargs))
        yield from ({"text": d} for d in DOCS[:2])
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", dropped)
    spec = spec_for(tmp_path, dataset="finewebedu")
    with pytest.raises(HarnessError, match=r"streaming HuggingFaceFW/fineweb-edu \(sample-10BT\) failed: "
                                           r"Connection reset by peer; .*needs the network") as info:
        TASK.fetch_data(spec, workers=0)
    assert "\n" not in str(info.value)
    assert calls == [("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "split": "train", "streaming": True})]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: iter({"text": d} for d in DOCS))
    assert "finewebedu ready in" in TASK.fetch_data(spec, workers=0)
    assert bins(shard_dir(tmp_path / "data", "finewebedu")) == expected_shards(DOCS, 100)


def test_a_budget_raised_to_exactly_what_is_written_needs_no_rows(tmp_path: Path) -> None:
    rows = [{"text": d} for d in DOCS]
    fineweb(rows, tmp_path, budget=40)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["settings"]["token_budget"] = 30  # as if an earlier run had a smaller budget and stopped on it
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert fineweb(iter(()), tmp_path, budget=40)["stopped_by"] == "token budget"


def test_offline_pydoc_source_is_prepared_on_first_use(tmp_path: Path) -> None:
    """`make defconfig-gpt2-tiny-cpu && make` must work without a separate `make prepare-data`."""
    spec = spec_for(tmp_path, dataset="pydoc")
    TASK.prepare(spec)
    assert (tmp_path / "data" / "gpt2" / "pydoc" / "meta.json").exists()
    x, _ = next(TASK.train_batches(spec, 4, seed=1))
    assert x.shape == (4, 8)


def test_network_sources_are_not_prepared_implicitly(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError, match="make prepare-data"):
        TASK.prepare(spec_for(tmp_path, dataset="finewebedu"))
