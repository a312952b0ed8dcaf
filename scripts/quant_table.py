"""The int8 export quality of whole results folders, mean ± std over seeds (docs/quantization.md).

    .venv/bin/python scripts/quant_table.py results/<folder> [results/<folder> ...]

For every ok run of each folder it reads the newest export made with QUANT=int8 (`make export RUN=<run>
QUANT=int8` writes it; a run without one is named and left out) and prints one markdown row per folder and
configuration: the model, whether CONFIG_QUANT_AWARE trained it, the target sparsity, the seeds, and the val
and test metric of the float32 model and of its int8 export, with the int8 - float32 difference. The numbers
are the model cards' (lib/checkpoint/export.py), measured when the export was made.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.checkpoint.versions import ExportVersions  # noqa: E402
from lib.core.errors import HarnessError  # noqa: E402
from lib.results import load as load_results  # noqa: E402

HEAD = ["| model | quantization-aware | target | seeds | val float32 | val int8 | val int8 - float32 | test float32 "
        "| test int8 | test int8 - float32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]


def int8_card(run_dir: Path) -> dict[str, Any] | None:
    """The model card of the run's newest QUANT=int8 export, or None."""
    for version in reversed(ExportVersions(run_dir).versions()):
        card = json.loads((version / "model_card.json").read_text())
        if card.get("quant"):
            return card
    return None


def rows(folders: list[Path], say: Any = print) -> list[str]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for folder in folders:
        for run in load_results(folder).runs:
            if run.summary.get("status") != "ok" or not run.directory:
                continue
            card = int8_card(run.directory)
            if card is None:
                say(f"{run.name}: no QUANT=int8 export; `make export RUN={run.directory} QUANT=int8` makes one")
                continue
            spec = card["spec"]
            key = (spec["model"], bool(spec["train"].get("quant_aware")), spec["prune"]["target"])
            groups[key].append(card["quant"]["quality"])
    lines = list(HEAD)
    for (model, aware, target), found in sorted(groups.items()):
        cells = []
        for split in ("val", "test"):
            cells += [_mean_std([q[split][k] for q in found]) for k in ("float32", "int8", "delta")]
        lines.append(f"| {model} | {'yes' if aware else 'no'} | {100 * target:g} % | {len(found)} | "
                     + " | ".join(cells) + " |")
    return lines


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        table = rows([Path(a) for a in argv], say=lambda line: print(line, file=sys.stderr))
    except HarnessError as exc:  # a folder that is not a results folder: one line
        sys.exit(f"error: {exc}")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
