"""`make publish NAME=<name> [RESULTS=dir]`: copy a results folder's record into key_results/.

Copied: summary.json, report.md, config.txt, matrix.json, sweep.md, graphs/ and, for
each run, its small records (spec.json, summary.json with its provenance,
metrics.jsonl, train.jsonl, surgery.json, sweep/, eval/, and each export version's model card with
export/latest).
Never copied: checkpoints, weights, logs, tracker folders. key_results/README.md's
index is then rewritten from every publication there (update_index). The destination is
key_results/<YYYY-mm-dd>_<name>/ and is never overwritten. Paths inside the
project (a spec's data_dir, say) are stored relative to the project root, so a
published record names nothing of the machine that made it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from lib.checkpoint.versions import FOLDER, LATEST, ExportVersions
from lib.core.errors import HarnessError
from lib.core import ROOT


TOP_FILES = ("summary.json", "report.md", "config.txt", "matrix.json", "sweep.md")
RUN_FILES = ("spec.json", "summary.json", "metrics.jsonl", "train.jsonl", "surgery.json", "sweep/sweep.json",
             "sweep/sweep.md", "sweep/sweep.png", "eval/lm_eval.json", "eval/lm_eval.md",
             "export/model_card.json")  # the last: an export made before versions
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def publish(folder: Path, name: str, dest_root: Path | None = None, date: str | None = None) -> Path:
    """Copy ``folder``'s results into dest_root/<date>_<name>/ (default key_results/, today); return it."""
    folder = Path(folder)
    if not name:
        raise HarnessError("publish needs a name: `make publish NAME=<name> [RESULTS=dir]`")
    if not NAME.match(name):
        raise HarnessError(f"publish name {name!r} must be letters, digits, '.', '_' or '-' (no spaces or '/')")
    if not (folder / "summary.json").is_file():
        raise HarnessError(f"{folder} has no summary.json; publish a results folder made by `make` "
                           f"(or finish it first with `make continue` / `make report`)")
    dest = Path(dest_root or ROOT / "key_results") / f"{date or time.strftime('%Y-%m-%d')}_{name}"
    if dest.exists():
        raise HarnessError(f"{dest} already exists; choose another NAME (published results are never overwritten)")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for file in TOP_FILES:
            if (folder / file).is_file():
                _copy(folder / file, tmp / file)
        if (folder / "graphs").is_dir():
            shutil.copytree(folder / "graphs", tmp / "graphs", ignore=shutil.ignore_patterns("*.tmp"),
                            copy_function=_copy)
        for run_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "graphs"):
            for name in _run_files(run_dir):
                (tmp / run_dir.name / name).parent.mkdir(parents=True, exist_ok=True)
                _copy(run_dir / name, tmp / run_dir.name / name)
        tmp.rename(dest)
        update_index(dest.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"cannot publish into {dest.parent}: {exc.strerror or exc}") from None
    return dest


def _run_files(run_dir: Path) -> list[str]:
    """What a publication carries of a run: RUN_FILES, each export version's model card and the `latest`
    pointer; never weights."""
    names = [f for f in RUN_FILES if (run_dir / f).is_file()]
    exports = ExportVersions(run_dir)
    names += [f"{FOLDER}/{v.name}/model_card.json" for v in exports.versions() if (v / "model_card.json").is_file()]
    return names + ([f"{FOLDER}/{LATEST}"] if (exports.folder / LATEST).is_file() else [])


TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt")


def _copy(src: str | Path, dst: str | Path) -> None:
    """Copy one file; in a text record, the project's absolute path becomes a project-relative one."""
    src, dst = Path(src), Path(dst)
    if src.suffix not in TEXT_SUFFIXES:
        shutil.copy2(src, dst)
        return
    dst.write_text(project_relative(src.read_text()))
    shutil.copystat(src, dst)


def project_relative(text: str, root: Path = ROOT) -> str:
    """``text`` with the project root's absolute path made relative ("<root>/data" -> "data")."""
    return text.replace(f"{root}/", "").replace(str(root), ".")


INDEX_START, INDEX_END = "<!-- index: rewritten by make publish -->", "<!-- end of index -->"


def update_index(root: Path) -> Path:
    """Rewrite the index table of root/README.md from every publication in ``root`` (newest first)."""
    readme = root / "README.md"
    text = readme.read_text() if readme.is_file() else "# Key results\n"
    table = "\n".join([INDEX_START, *index_lines(root), INDEX_END])
    if INDEX_START in text and INDEX_END in text:
        head, _, rest = text.partition(INDEX_START)
        text = head + table + rest.partition(INDEX_END)[2]
    elif "\n## Status" in text:
        head, _, rest = text.partition("\n## Status")
        text = f"{head}\n## Index\n\n{table}\n\n## Status{rest}"
    else:
        text = f"{text.rstrip()}\n\n## Index\n\n{table}\n"
    readme.write_text(text)
    return readme


def index_lines(root: Path) -> list[str]:
    """The index table: each publication's name, date, commit, command and a one-line result."""
    rows = ["| publication | date | commit | command | result |", "|---|---|---|---|---|"]
    for folder in sorted((p for p in root.iterdir() if (p / "summary.json").is_file()), reverse=True):
        summary = _json(folder / "summary.json")
        runs = summary.get("runs") or []
        date, _, name = folder.name.partition("_")
        rows.append(f"| [{name}]({folder.name}/report.md) | {date} | {_commit(runs)} | "
                    f"`{clean_command(summary.get('command') or '')}` | {_result(runs)} |")
    return rows


def clean_command(command: str) -> str:
    """The command without where it happened to write (absolute RESULTS_DIR / KCONFIG_CONFIG paths)."""
    words = [w for w in command.split() if not re.match(r"^(RESULTS_DIR|KCONFIG_CONFIG|DEFCONFIG_OUT)=/", w)]
    return project_relative(" ".join(words)).replace("|", "\\|") or "(not recorded)"


def _commit(runs: list[dict]) -> str:
    found = {(p.get("commit") or "?")[:7] + ("+dirty" if p.get("dirty") else "")
             for r in runs if isinstance(p := r.get("provenance"), dict)}
    return ", ".join(sorted(found)) if found else "not recorded"


def _result(runs: list[dict]) -> str:
    """Runs ok of all, and the run best by validation with its test metric (never ranked on test)."""
    ok = [r for r in runs if r.get("status") == "ok" and r.get("best")]
    text = f"{len(ok)} of {len(runs)} runs ok"
    if not ok:
        return text
    metric = ok[0].get("metric") or {"name": "accuracy", "higher_is_better": True}
    sign = 1 if metric.get("higher_is_better", True) else -1
    best = max(ok, key=lambda r: sign * (r["best"]["val"].get(metric["name"]) or 0))
    test = (best.get("test_at_best") or {}).get(metric["name"])
    return (f"{text}; best by val: {best['name']} (val {metric['name']} {best['best']['val'][metric['name']]:.2f}, "
            f"test {test:.2f})" if test is not None else text)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
