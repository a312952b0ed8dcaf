"""lib/results/compare.py (ranking and two-folder view) and lib/results/publish.py, on hand-written results folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib import cli
from lib.core.errors import HarnessError
from lib.results.compare import compare
from lib.results.publish import publish
from lib.results.report import render
from lib.results.stats import compare_seeds, t95
from tests.results.synthetic_results import ACCURACY, PERPLEXITY, build, set_run
from tests.conftest import ROOT


def _section(text: str, model: str) -> str:
    """The part of a compare view about ``model``."""
    return text.split(f"## {model}:", 1)[1].split("\n## ", 1)[0]


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| sparsity")]


def test_the_stated_tests_by_hand():
    t = compare_seeds({1: 0.0, 2: 0.0, 3: 0.0}, {1: 5.0, 2: 5.1, 3: 4.9})  # paired: mean 5, sd 0.1, t(2) = 4.303
    assert (t.kind, t.n) == ("paired", "3") and t.significant
    assert abs(t.low - (5 - 4.303 * 0.1 / 3**0.5)) < 1e-9 and abs(t.high - (5 + 4.303 * 0.1 / 3**0.5)) < 1e-9
    assert t.text() == "+5.00 [+4.75, +5.25] (paired t, n=3): significant"
    wide = compare_seeds({1: 0.0, 2: 0.0, 3: 0.0}, {1: 1.0, 2: 2.0, 3: 3.0})
    assert wide.text() == "+2.00 [-0.48, +4.48] (paired t, n=3): not significant"
    w = compare_seeds({1: 1.0, 2: 2.0, 3: 3.0}, {4: 4.0, 5: 5.0, 6: 6.0, 7: 7.0})  # Welch df 4.96 -> t(4) = 2.776
    assert w.text() == "+3.50 [+1.10, +5.90] (Welch t, n=3+4): significant"
    one = compare_seeds({1: 97.0}, {1: 98.0, 2: 99.0})
    assert one.text() == "no test possible (one seed on a side)" and one.significant is None
    assert t95(4.96) == t95(4) == 2.776 and t95(500) == 1.96


def test_ranking_is_by_validation_never_by_test(tmp_path):
    folder = build(tmp_path / "r", ACCURACY, PERPLEXITY)
    for seed in (1, 2):  # sgd/magnitude 50 %: the better validation, the worse test
        set_run(folder, f"lenet5_sgd_magnitude_50_s{seed}", best={"step": 20, "val": {"loss": 0.5, "accuracy": 99.0}})
    out = compare(folder)
    rows = _rows(out)
    assert rows[0][:5] == ["0%", "1", "adamw/none", "97.70 ± 0.28 (n=2/2)", "98.20 ± 0.28 (n=2/2)"]
    at50 = [r for r in _rows(_section(out, "lenet5")) if r[0] == "50%"]
    assert [r[1:3] for r in at50] == [["1", "sgd/magnitude"], ["2", "adamw/magnitude"]]
    assert at50[0][4] == "97.60 ± 0.28 (n=2/2)" and at50[1][4] == "97.70 ± 0.28 (n=2/2)"  # test only reported
    assert at50[1][5] == compare_seeds({1: 97.8, 2: 97.4}, {1: 97.5, 2: 97.9}).text()
    assert at50[0][6] == compare_seeds({1: 97.0, 2: 97.2}, {1: 97.8, 2: 97.4}).text()  # vs sgd's dense run
    assert "never by test" in out and "paired over the seeds both sides share" in out
    # perplexity: the lowest validation ranks first
    gpt2 = [r[1:3] for r in _rows(_section(out, "gpt2")) if r[0] == "50%"]
    assert gpt2 == [["1", "adamwprune/bitter7/state"], ["2", "adamw/magnitude"]]
    report = render(folder)
    assert "- 50%: sgd/magnitude: val 99.00 ± 0.00, test 97.60 ± 0.28" in report
    assert "Best test" not in report


def test_single_seed_and_failed_groups(tmp_path):
    folder = build(tmp_path / "one", ACCURACY, seeds=(1,))
    set_run(folder, "lenet5_sgd_magnitude_90_s1", status="failed", error="boom", test_at_best=None)
    rows = _rows(compare(folder))
    assert ["50%", "1", "sgd/magnitude", "97.30 (n=1/1)", "97.80 (n=1/1)", "-",
            "no test possible (one seed on a side)"] in rows
    assert ["50%", "2", "adamw/magnitude", "97.00 (n=1/1)", "97.50 (n=1/1)", "no test possible (one seed on a side)",
            "no test possible (one seed on a side)"] in rows
    assert ["90%", "-", "sgd/magnitude", "- (n=0/1)", "-", "no finished run", "-"] in rows


def test_two_folders_pair_only_the_same_method(tmp_path):
    a = build(tmp_path / "a", ACCURACY, PERPLEXITY)
    b = build(tmp_path / "b", ACCURACY)
    set_run(b, "lenet5_adamw_magnitude_50_s1", test_at_best={"step": 20, "loss": 1.0, "accuracy": 99.5})
    set_run(b, "lenet5_adamw_magnitude_50_s2", test_at_best={"step": 20, "loss": 1.0, "accuracy": 99.9})
    for seed in (1, 2):  # scored by gradient sensitivity in B: another method, never paired with A's magnitude
        spec = json.loads((b / f"lenet5_sgd_magnitude_90_s{seed}" / "spec.json").read_text())
        spec["prune"]["importance"] = "gradient-sensitivity"
        set_run(b, f"lenet5_sgd_magnitude_90_s{seed}", spec=spec)
    out = compare(a, b)
    rows = {(r[0], r[1]): r for r in _rows(_section(out, "lenet5"))}
    assert rows[("50%", "adamw/magnitude")][4] == "+2.00 [+2.00, +2.00] (paired t, n=2): significant"
    assert rows[("90%", "sgd/magnitude")][4] == ("unpaired: another method (prune.importance 'magnitude' vs "
                                                 "'gradient-sensitivity')")
    gpt2 = {(r[0], r[1]): r for r in _rows(_section(out, "gpt2"))}
    assert gpt2[("50%", "adamwprune/bitter7/state")][3:] == ["-", "unpaired: only in A"]


def test_two_folders_with_one_seed_against_three_give_no_verdict(tmp_path):
    a = build(tmp_path / "a", ACCURACY, seeds=(1,))
    b = build(tmp_path / "b", ACCURACY)
    rows = {(r[0], r[1]): r for r in _rows(compare(a, b))}
    assert rows[("50%", "adamw/magnitude")][4] == "no test possible (one seed on a side)"


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
    assert ["0%", "2", "sgd/none", "96.70 (n=1/2)", "97.20 (n=1/2)", "no test possible (one seed on a side)", "-"] \
        in _rows(out)
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
    from lib.results.publish import ROOT

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
    text = (ROOT / "key_results" / "README.md").read_text()
    for number in ("37.28", "40.94", "44.15", "74.56", "90.30", "1307.6", "42.82", "51.51"):
        assert number in text, number
    for name in ("gpt2-finewebedu-bitter7", "gpt2-finewebedu-bitter8", "gpt2-finewebedu-spam-vs-bitter7"):
        assert name in text, name
