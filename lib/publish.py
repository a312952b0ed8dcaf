"""`make publish NAME=<name> [RESULTS=dir]`: copy a results folder's record into key_results/.

Copied: summary.json, report.md, config.txt, matrix.json, graphs/ and, for each
run, its small JSON records (spec.json, summary.json, metrics.jsonl,
train.jsonl). Never copied: checkpoints, logs, tracker folders. The destination is
key_results/<YYYY-mm-dd>_<name>/ and is never overwritten. Paths inside the
project (a spec's data_dir, say) are stored relative to the project root, so a
published record names nothing of the machine that made it.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from lib.errors import HarnessError

ROOT = Path(__file__).resolve().parent.parent

TOP_FILES = ("summary.json", "report.md", "config.txt", "matrix.json")
RUN_FILES = ("spec.json", "summary.json", "metrics.jsonl", "train.jsonl")
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
            files = [run_dir / f for f in RUN_FILES if (run_dir / f).is_file()]
            if files:
                (tmp / run_dir.name).mkdir()
                for f in files:
                    _copy(f, tmp / run_dir.name / f.name)
        tmp.rename(dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"cannot publish into {dest.parent}: {exc.strerror or exc}") from None
    return dest


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
