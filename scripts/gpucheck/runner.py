"""Run the parts one by one, each in its own process with its budget, and keep the record.

The record (gpu_check.json and gpu_check.md) is rewritten after every part, so a
check stopped half-way still leaves what it measured. Checkpoint files a part left
in its work folder are deleted once it ends (GPT-2 124M's weigh hundreds of MB).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gpucheck import PARTS, ROOT, TOTAL_BUDGET_S, Context, Part, result
from lib.checkpoint.folder import BULKY_PATTERNS
from lib.matrix.records import failure_line

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_all(out: Path, dry: bool, only: list[str], header: dict[str, Any], parts: tuple[Part, ...] = PARTS,
            say: Any = print) -> dict[str, Any]:
    """Every part of ``parts`` (those named in ``only``, if any); the record as written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    record = {**header, "dry": dry, "budget_s": sum(p.dry_budget_s if dry else p.budget_s for p in parts),
              "parts": []}
    for part in parts:
        if only and part.key not in only:
            continue
        say(f"part {part.number} ({part.key}): {part.title} ...", flush=True)
        entry = run_one(part, out, dry)
        record["parts"].append(entry)
        write(out, record)
        why = f": {entry['reason']}" if entry["reason"] else ""
        say(f"part {part.number} ({part.key}): {entry['status']} in {entry['seconds']:.0f} s of "
            f"{entry['budget_s']} s{why}", flush=True)
    record["status"] = "ok" if all(p["status"] in ("ok", "skipped") for p in record["parts"]) else "failed"
    write(out, record)
    return record


def run_one(part: Part, out: Path, dry: bool) -> dict[str, Any]:
    """``part`` in a child process killed at its budget; its entry of the record."""
    budget = part.dry_budget_s if dry else part.budget_s
    work = out / part.key
    work.mkdir(parents=True, exist_ok=True)
    answer = work / "part.json"
    command = [sys.executable, str(SCRIPT), "--part", part.key, "--module", part.module_name, "--work", str(work),
               "--budget", str(budget), "--min-free-gib", str(part.min_free_gib)]
    started, timed_out = time.perf_counter(), False
    with (work / "log.txt").open("w") as log:
        child = subprocess.Popen(command + (["--dry"] if dry else []), cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            timed_out = True
    seconds = time.perf_counter() - started
    if timed_out:
        entry = result("timeout", f"over its {budget} s budget; killed (the other parts went on)")
    elif answer.exists():
        entry = json.loads(answer.read_text())
    else:
        entry = result("failed", f"exit {child.returncode} without a result: {failure_line(work / 'log.txt')[:300]}")
    _drop_bulky(work)
    return {"part": part.key, "number": part.number, "title": part.title, **entry, "seconds": round(seconds, 1),
            "budget_s": budget, "log": str((work / "log.txt").relative_to(out))}


def _kill_group(child: subprocess.Popen) -> None:
    """The part and everything it started (a training run, torch.compile's workers)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _drop_bulky(work: Path) -> None:
    for pattern in BULKY_PATTERNS:
        for path in work.rglob(pattern):
            path.unlink(missing_ok=True)


def child(module: str, work: Path, budget: float, dry: bool, min_free_gib: float) -> int:
    """The part process: run ``module``'s part and write its answer to ``work``/part.json (unless killed)."""
    answer = work / "part.json"
    answer.unlink(missing_ok=True)
    try:
        entry = _gate(min_free_gib, dry) or importlib.import_module(module).run(
            Context(dry=dry, device="cpu" if dry else "cuda", work=work, budget_s=budget))
    except (ImportError, AttributeError) as exc:  # an API this torch lacks (2.11 to 2.13 are supported)
        traceback.print_exc()
        entry = _missing_api(exc)
    except Exception as exc:  # a part's failure is its record, never the others'
        traceback.print_exc()
        entry = result("failed", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}")
    answer.write_text(json.dumps(entry, indent=1, default=str) + "\n")
    return 0


def _missing_api(exc: Exception) -> dict:
    """Skipped when this torch lacks what the part needs; any other import or attribute error is a failure."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if "torch" in text:
        import torch

        return result("skipped", f"torch {torch.__version__} lacks what this part needs: {text}")
    return result("failed", f"{type(exc).__name__}: {text}")


def _gate(min_free_gib: float, dry: bool) -> dict | None:
    """Skipped, with the figures, when the GPU has too little free memory for the part."""
    if dry or not min_free_gib:
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    if free < min_free_gib * 2**30:
        return result("skipped", f"needs {min_free_gib:.0f} GiB of free GPU memory; {free / 2**30:.1f} GiB "
                                 f"of {total / 2**30:.1f} GiB are free")
    return None


def write(out: Path, record: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    """gpu_check.md: the summary table, then each part's figures."""
    box = record.get("box", {})
    lines = [f"# GPU check {record.get('stamp', '')}{' (DRY=1: set-up only, on the CPU)' if record['dry'] else ''}",
             "", f"- device: {box.get('device', '?')}", f"- torch {box.get('torch', '?')}, CUDA "
             f"{box.get('cuda') or 'none'}, Python {box.get('python', '?')}",
             f"- commit {record.get('commit', '?')}; budget {record['budget_s']} s "
             f"(full check: {TOTAL_BUDGET_S} s on one H100)", "",
             "| part | what | status | seconds | budget | note |", "|---:|---|---|---:|---:|---|"]
    for p in record["parts"]:
        lines.append(f"| {p['number']} | {p['title']} | {p['status']} | {p['seconds']:.0f} | {p['budget_s']} | "
                     f"{p['reason'].replace('|', '/')} |")
    for p in record["parts"]:
        if p["rows"]:
            lines += ["", f"## {p['number']}. {p['title']}", "", "| | |", "|---|---|"]
            lines += [f"| {label} | {value} |" for label, value in p["rows"]]
    return "\n".join(lines) + "\n"
