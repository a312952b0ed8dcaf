"""`make eval RUN=<run dir> TASKS=<names or YAML files>`: EleutherAI's lm-evaluation-harness on a run's
transformers export (docs/huggingface.md, "Evaluation with lm-evaluation-harness").

The run's newest export (export/latest) is used when it has a transformers folder, else the best
checkpoint is exported with FORMAT=hf as a new version; lm-eval's ``hf`` model loads that folder, and
the results land beside the run:

    <run dir>/eval/lm_eval.json   every task's metrics with their standard errors, sample counts, task
                                  versions, lm-eval and transformers versions, device, date
    <run dir>/eval/lm_eval.md     the same as a table (the results folder's report.md shows it too)

TASKS is a comma-separated list of lm-eval task names, or paths to task YAML files (or folders of them),
which lm-eval reads with its TaskManager's include path. Standard tasks download their datasets from the
Hugging Face Hub when they run; a YAML over a local JSON file needs no network.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lib.core.errors import HarnessError
from lib.core.files import write_json_atomic, write_text_atomic

INSTALL = "`make eval` installs it into .venv from requirements-eval.txt (needs the package index once)"


def evaluate(run_dir: Path, tasks: str, limit: int | None = None, say: Any = print) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on ``run_dir``'s transformers export; write and return the record."""
    import torch

    names, include, standard = _tasks(tasks)
    folder = _hf_export(Path(run_dir), say)
    lm_eval, task_manager = _lm_eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    say(f"eval: lm-eval {', '.join(names)} on {folder} ({device})")
    started = time.time()
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                                      tasks=names, device=device, batch_size=8, limit=limit, log_samples=False,
                                      task_manager=task_manager(include_path=include or None,
                                                                include_defaults=standard))
    except KeyError as exc:  # lm-eval's word for a name it has no task for
        raise HarnessError(f"TASKS: {exc.args[0] if exc.args else exc}; name lm-eval tasks (`lm-eval ls tasks`) "
                           f"or give a task YAML file") from None
    except (ConnectionError, FileNotFoundError) as exc:
        raise HarnessError(f"TASKS={tasks}: a task's dataset is not here and cannot be downloaded ({_first(exc)}); "
                           f"run standard tasks where the Hugging Face Hub is reachable, or give a task YAML over "
                           f"a local file (docs/huggingface.md)") from None
    record = {"run": Path(run_dir).name, "model": str(folder.relative_to(run_dir)), "tasks": names, "limit": limit, "device": device,
              "results": out["results"], "versions": out.get("versions"), "n_samples": out.get("n-samples"),
              "lm_eval_version": out.get("lm_eval_version"), "transformers_version": out.get("transformers_version"),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": round(time.time() - started, 1)}
    (Path(run_dir) / "eval").mkdir(exist_ok=True)
    write_json_atomic(Path(run_dir) / "eval" / "lm_eval.json", record)
    table = "\n".join(markdown(record)) + "\n"
    write_text_atomic(Path(run_dir) / "eval" / "lm_eval.md", table)
    say(table)
    return record


def rows(record: dict[str, Any]) -> list[list[str]]:
    """[task, metric, value, stderr, samples] for every metric of every task in a record."""
    found = []
    for task, metrics in (record.get("results") or {}).items():
        n = ((record.get("n_samples") or {}).get(task) or {}).get("effective", "")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "name", "sample_len") or metric.endswith("_stderr") or not _number(value):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            found.append([task, metric if filt == "none" else f"{metric} ({filt})", f"{value:.4f}",
                          f"{err:.4f}" if _number(err) else "n/a", str(n)])
    return found


def markdown(record: dict[str, Any]) -> list[str]:
    lines = ["| task | metric | value | stderr | samples |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(record)]
    return lines + ["", f"lm-eval {record.get('lm_eval_version')}, transformers {record.get('transformers_version')}, "
                        f"{record.get('device')}, {record.get('date')}"]


def _lm_eval() -> tuple[Any, Any]:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError(f"lm-evaluation-harness is not installed; {INSTALL}") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # lm-eval shows its own; an error stays one line on stderr
    return lm_eval, TaskManager


def _tasks(text: str) -> tuple[list[str], list[str], bool]:
    """(task names, YAML folders to include, whether any is a standard task) from TASKS: a YAML path stands
    for the task it defines. Indexing lm-eval's own few thousand task YAMLs takes about 13 s on 2 cores, so
    it happens only when a standard task is named."""
    names, include, standard = [], [], False
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        path = Path(item)
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise HarnessError(f"TASKS: {item} does not exist")
            include.append(str(path.resolve() if path.is_dir() else path.resolve().parent))
            names += _yaml_tasks(path)
        else:
            names.append(item)
            standard = True
    if not names:
        raise HarnessError("make eval needs TASKS=<lm-eval task names or task YAML files>, e.g. TASKS=hellaswag")
    return names, sorted(set(include)), standard


def _yaml_tasks(path: Path) -> list[str]:
    import yaml

    found = []
    for file in sorted(path.glob("*.y*ml")) if path.is_dir() else [path]:
        try:
            config = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise HarnessError(f"TASKS: {file} is not a readable task YAML ({_first(exc)})") from None
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise HarnessError(f"TASKS: {file} names no task (a `task: <name>` line)")
        found.append(config["task"])
    return found


def _hf_export(run_dir: Path, say: Any) -> Path:
    from lib.checkpoint.export import export
    from lib.checkpoint.versions import ExportVersions

    latest = ExportVersions(run_dir).latest()  # the newest export, if it has a transformers folder
    folder = latest / "hf" if latest is not None else None
    if folder is None or not (folder / "config.json").is_file():
        folder = export(run_dir, "hf") / "hf"
        say(f"eval: exported {run_dir}'s best checkpoint to {folder}")
    if not (folder / "vocab.json").is_file():
        raise HarnessError(f"{folder} has no tokenizer: the model's vocabulary is not the GPT-2 BPE's, and lm-eval "
                           f"needs one to turn task text into tokens")
    return folder


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
