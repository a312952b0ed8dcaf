"""lib/compare.py (ranking and two-folder view) and lib/publish.py, on hand-written results folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib import cli
from lib.compare import compare, significance
from lib.errors import HarnessError
from lib.publish import publish
from lib.results import Stat
from tests.synthetic_results import ACCURACY, PERPLEXITY, build, set_run


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| sparsity")]


def test_significance_rule():
    assert significance(Stat(97.7, 0.28, 2), Stat(97.6, 0.28, 2)) == "not significant"
    assert significance(Stat(95.5, 0.71, 2), Stat(90.5, 0.71, 2)) == "significant"
    assert significance(Stat(95.5, None, 1), Stat(90.5, 0.71, 2)) == "n/a (1 seed)"


def test_ranking_per_sparsity_marks_differences_within_the_seed_spread(tmp_path):
    out = compare(build(tmp_path / "r", ACCURACY, PERPLEXITY))
    rows = _rows(out)
    assert ["50%", "1", "adamw/magnitude", "97.70 ± 0.28 (n=2/2)", "-", "-"] in rows
    assert ["50%", "2", "sgd/magnitude", "97.60 ± 0.28 (n=2/2)", "-0.10", "not significant"] in rows
    assert ["90%", "2", "sgd/magnitude", "90.50 ± 0.71 (n=2/2)", "-5.00", "significant"] in rows
    # perplexity: the lowest ranks first
    assert ["50%", "1", "adamwprune/bitter7/state", "37.28 ± 0.40 (n=2/2)", "-", "-"] in rows
    assert ["50%", "2", "adamw/magnitude", "44.15 ± 0.21 (n=2/2)", "+6.87", "significant"] in rows
    assert "lower is better" in out and "|Δ mean| < max(std of the two)" in out


def test_single_seed_and_failed_groups(tmp_path):
    folder = build(tmp_path / "one", ACCURACY, seeds=(1,))
    set_run(folder, "lenet5_sgd_magnitude_90_s1", status="failed", error="boom", test_at_best=None)
    rows = _rows(compare(folder))
    assert ["50%", "2", "adamw/magnitude", "97.50 (n=1/1)", "-0.30", "n/a (1 seed)"] in rows
    assert ["90%", "-", "sgd/magnitude", "- (n=0/1)", "-", "no finished run"] in rows


def test_two_folders_side_by_side(tmp_path):
    a = build(tmp_path / "a", ACCURACY, PERPLEXITY)
    b = build(tmp_path / "b", ACCURACY)
    set_run(b, "lenet5_sgd_magnitude_90_s1", test_at_best={"step": 20, "loss": 1.0, "accuracy": 95.0})
    set_run(b, "lenet5_adamw_magnitude_50_s1", test_at_best={"step": 20, "loss": 1.0, "accuracy": 99.5})
    set_run(b, "lenet5_adamw_magnitude_50_s2", test_at_best={"step": 20, "loss": 1.0, "accuracy": 99.9})
    out = compare(a, b)
    assert out.startswith("# Compare: A = a vs B = b")
    rows = _rows(out)
    assert ["90%", "sgd/magnitude", "90.50 ± 0.71 (n=2/2)", "93.00 ± 2.83 (n=2/2)", "+2.50", "B",
            "not significant"] in rows
    assert ["50%", "adamw/magnitude", "97.70 ± 0.28 (n=2/2)", "99.70 ± 0.28 (n=2/2)", "+2.00", "B",
            "significant"] in rows
    assert ["50%", "adamwprune/bitter7/state", "37.28 ± 0.40 (n=2/2)", "- (n=0/0)", "-", "-", "only in A"] in rows


def test_compare_cli_prints_markdown_and_rejects_a_missing_folder(tmp_path, capsys):
    a = build(tmp_path / "a", ACCURACY)
    assert cli.main(["compare", "--results", str(a), "--against", str(a)]) == 0
    assert "| 50% | adamw/magnitude |" in capsys.readouterr().out
    assert cli.main(["compare", "--results", str(a), "--against", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope is not a folder" in err and "\n" not in err


def test_compare_tolerates_empty_and_interrupted_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No runs in this folder" in compare(empty)
    cut = build(tmp_path / "cut", ACCURACY)
    (cut / "summary.json").write_text('{"runs": [{"name": "lenet5_')
    (cut / "lenet5_sgd_none_0_s1" / "summary.json").unlink()
    out = compare(cut)
    assert ["0%", "2", "sgd/none", "97.20 (n=1/2)", "-1.00", "n/a (1 seed)"] in _rows(out)
    assert "summary.json is truncated or not JSON" in out


def test_publish_copies_the_record_and_never_checkpoints(tmp_path):
    folder = build(tmp_path / "res", ACCURACY)
    (folder / "graphs").mkdir()
    (folder / "graphs" / "metric_vs_sparsity_lenet5.png").write_bytes(b"png")
    (folder / "report.md").write_text("# report\n")
    dest = publish(folder, "lenet5-check", dest_root=tmp_path / "key_results", date="2025-02-03")
    assert dest == tmp_path / "key_results" / "2025-02-03_lenet5-check"
    files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert {"summary.json", "report.md", "config.txt", "matrix.json", "graphs/metric_vs_sparsity_lenet5.png",
            "lenet5_adamw_none_0_s1/summary.json", "lenet5_adamw_none_0_s1/metrics.jsonl",
            "lenet5_adamw_none_0_s1/train.jsonl", "lenet5_adamw_none_0_s1/spec.json"} <= files
    assert not [f for f in files if "checkpoints" in f or f.endswith((".pt", "log.txt"))]
    assert json.loads((dest / "summary.json").read_text()) == json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("name,setup,message", [
    ("", None, "publish needs a name"),
    ("bad name/x", None, "must be letters, digits"),
    ("ok", "no_summary", "has no summary.json"),
    ("ok", "exists", "already exists"),
])
def test_publish_refuses_bad_input(tmp_path, name, setup, message):
    folder = build(tmp_path / "res", ACCURACY)
    if setup == "no_summary":
        (folder / "summary.json").unlink()
    if setup == "exists":
        (tmp_path / "kr" / "2025-02-03_ok").mkdir(parents=True)
    with pytest.raises(HarnessError, match=message):
        publish(folder, name, dest_root=tmp_path / "kr", date="2025-02-03")
    assert not list((tmp_path / "kr").glob("*.partial")) if (tmp_path / "kr").exists() else True


def test_publish_cli_without_name_is_one_line(tmp_path, capsys):
    assert cli.main(["publish", "--name", "", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make publish NAME=<name>" in err


def test_published_records_hold_no_absolute_project_path(tmp_path):
    from lib.publish import ROOT

    folder = build(tmp_path / "res", ACCURACY)
    spec = folder / "lenet5_adamw_none_0_s1" / "spec.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "data_dir": str(ROOT / "data")}))
    dest = publish(folder, "paths", dest_root=tmp_path / "kr", date="2025-02-03")
    assert json.loads((dest / "lenet5_adamw_none_0_s1" / "spec.json").read_text())["data_dir"] == "data"
    published = [p for p in (ROOT / "key_results").rglob("*") if p.suffix in (".json", ".jsonl", ".md", ".txt")]
    for path in [*dest.rglob("*.json"), *published]:
        assert str(ROOT) not in path.read_text(), path
    for spec in (ROOT / "key_results").rglob("spec.json"):  # made on another machine: no absolute data_dir
        assert not Path(json.loads(spec.read_text())["data_dir"]).is_absolute(), spec


def test_key_results_readme_lists_the_seed_tables():
    text = (Path(__file__).resolve().parent.parent / "key_results" / "README.md").read_text()
    for number in ("37.28", "40.94", "44.15", "74.56", "90.30", "1307.6", "42.82", "51.51"):
        assert number in text, number
    for name in ("gpt2-finewebedu-bitter7", "gpt2-finewebedu-bitter8", "gpt2-finewebedu-spam-vs-bitter7"):
        assert name in text, name
