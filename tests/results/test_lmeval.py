"""`make eval`: lm-evaluation-harness on a run's transformers export (lib/results/lmeval.py), offline.

A tiny GPT-2 with the GPT-2 vocabulary is trained by the harness, then `make eval` runs a task YAML over a
local JSON file that this test writes (standard tasks download their datasets; there is no network here).
lm-eval is an extra (`make eval-deps`); without it these tests skip, except the one that checks the line
a missing lm-eval gives.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
from pathlib import Path

import pytest

from lib import cli
from lib.results.report import render
from tests.conftest import ROOT, synthetic_spec, tiny_spec, trained_run
from tests.make_driver import base_env, make, output

QUESTIONS = [("The capital of France is", [" Paris", " a banana", " seven"]),
             ("Two plus two equals", [" four", " purple", " Tuesday"]),
             ("The opposite of hot is", [" cold", " table", " loud"]),
             ("A week has seven", [" days", " wheels", " colours"])]
TASK = """task: harness_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def offline_env(tmp: Path) -> dict[str, str]:
    """No network, and every Hugging Face cache inside the test's folder."""
    return base_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf_home"),
                    TRANSFORMERS_VERBOSITY="error")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 run with the padded GPT-2 vocabulary (50304 rows), so the BPE tokenizer goes with it."""
    tmp = tmp_path_factory.mktemp("lmeval")
    spec = synthetic_spec(tmp, name="gpt2_bpe", max_iters=4, eval_interval=2)
    spec = dataclasses.replace(spec, model_options={**spec.model_options, "vocab_size": 50304})
    return trained_run(tmp, spec)


@pytest.fixture
def local_task(tmp_path: Path) -> Path:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in QUESTIONS))
    task = tmp_path / "harness_local_mc.yaml"
    task.write_text(TASK.format(data=data))
    return task


def test_make_eval_runs_a_local_task_offline_and_the_report_shows_it(gpt2_run: Path, local_task: Path,
                                                                     tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an extra: `make eval-deps` installs it")
    stamp = ROOT / ".venv" / ".eval-installed"
    newer = [ROOT / "requirements-eval.txt", ROOT / ".venv" / ".installed"]
    if not stamp.exists() or any(p.stat().st_mtime > stamp.stat().st_mtime for p in newer):
        pytest.skip("`make eval-deps` is not current here, and make would install (the tests never install)")
    result = make(tmp_path, "eval", RUN=str(gpt2_run), TASKS=str(local_task), env=offline_env(tmp_path),
                  timeout=300)
    assert result.returncode == 0, output(result)
    record = json.loads((gpt2_run / "eval" / "lm_eval.json").read_text())
    metrics = record["results"]["harness_local_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and record["n_samples"]["harness_local_mc"]["effective"] == 4
    assert metrics["acc,none"] * 4 == round(metrics["acc,none"] * 4)  # a share of the 4 questions
    assert record["model"] == "export/v1/hf" and (gpt2_run / record["model"] / "vocab.json").is_file()  # exported
    table = (gpt2_run / "eval" / "lm_eval.md").read_text()
    assert f"| harness_local_mc | acc | {metrics['acc,none']:.4f} |" in table
    report = render(gpt2_run.parent)
    assert "### lm-evaluation-harness (`make eval`)" in report and "| gpt2_bpe | harness_local_mc | acc |" in report


def test_a_hub_dataset_offline_is_one_line(gpt2_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A task whose dataset lives on the Hub, offline: one line. The task is a YAML so that lm-eval does not
    index its own task folder (13 s); a standard name such as hellaswag takes the same path."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an extra: `make eval-deps` installs it")
    for name, value in offline_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    task = tmp_path / "hub_task.yaml"
    task.write_text(TASK.replace("harness_local_mc", "hub_mc").replace("dataset_path: json", "dataset_path: Rowan/hellaswag")
                    .replace("dataset_kwargs:\n  data_files:\n    test: {data}\n", ""))
    assert cli.main(["eval", "--run", str(gpt2_run), "--tasks", str(task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a task's dataset is not here and cannot be downloaded" in err[0], err


def test_eval_bad_input_is_one_line(gpt2_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    lenet = trained_run(tmp_path, tiny_spec("lenet", max_iters=2))
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    cases = [(["eval", "--run", str(gpt2_run)], "make eval needs TASKS="),
             (["eval", "--run", str(gpt2_run), "--tasks", str(nameless)], "names no task (a `task: <name>` line)"),
             (["eval", "--run", str(gpt2_run), "--tasks", str(tmp_path / "gone.yaml")], "gone.yaml does not exist"),
             (["eval", "--run", str(lenet), "--tasks", "x"], "FORMAT=hf: transformers has no model class for lenet5"),
             (["eval", "--tasks", "x"], "eval needs a run folder")]
    real_import = builtins.__import__
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)

    def no_lm_eval(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert cli.main(["eval", "--run", str(gpt2_run), "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm-evaluation-harness is not installed; `make eval` installs it" in err[0], err
