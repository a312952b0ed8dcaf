"""Hand-written results folders for the report, graph, compare and publish tests (no training).

Two tasks, 2 seeds each, a dense run and two sparsities per pruning method:
an accuracy task (lenet5, CPU memory figures) and a perplexity task (gpt2, GPU
memory figures). The test metric values below are what the tests look for.
"""

from __future__ import annotations

import json
from pathlib import Path

from lib.checkpoint.folder import RunCheckpoints

# (model, optimizer, variant, pruning, target) -> test metric at best, per seed (1, 2)
ACCURACY = {
    ("lenet5", "adamw", "", "none", 0.0): (98.0, 98.4),
    ("lenet5", "sgd", "", "none", 0.0): (97.0, 97.2),
    ("lenet5", "adamw", "", "magnitude", 0.5): (97.5, 97.9),  # 97.70 ± 0.28
    ("lenet5", "sgd", "", "magnitude", 0.5): (97.8, 97.4),  # 97.60 ± 0.28: within the spread of adamw
    ("lenet5", "adamw", "", "magnitude", 0.9): (95.0, 96.0),  # 95.50 ± 0.71
    ("lenet5", "sgd", "", "magnitude", 0.9): (90.0, 91.0),  # 90.50 ± 0.71: 5 points worse, significant
}
PERPLEXITY = {
    ("gpt2", "adamw", "", "none", 0.0): (40.0, 41.0),  # 40.50 ± 0.71
    ("gpt2", "adamw", "", "magnitude", 0.5): (44.0, 44.3),  # 44.15 ± 0.21
    ("gpt2", "adamwprune", "bitter7", "state", 0.5): (37.0, 37.56),  # 37.28 ± 0.40: the lowest, best
    ("gpt2", "adamw", "", "magnitude", 0.7): (46.0, 47.0),
    ("gpt2", "adamwprune", "bitter7", "state", 0.7): (39.0, 39.4),
}
SEEDS = (1, 2)
STEPS = (10, 20, 30)


def run_name(model: str, optimizer: str, variant: str, pruning: str, target: float, seed: int) -> str:
    return f"{model}_{optimizer}{'_' + variant if variant else ''}_{pruning}_{target * 100:g}_s{seed}"


def write_run(folder: Path, key: tuple, seed: int, test: float) -> dict:
    """One run folder (spec.json, summary.json, metrics.jsonl, train.jsonl); returns its summary."""
    model, optimizer, variant, pruning, target = key
    accuracy = model == "lenet5"
    name = run_name(*key, seed)
    metric = {"name": "accuracy", "higher_is_better": True, "unit": "%"} if accuracy else \
        {"name": "perplexity", "higher_is_better": False, "unit": ""}
    sign = 1 if accuracy else -1
    vals = [test - sign * 2.0, test - sign * 0.5, test - sign * 1.0]  # the best val is at step 20
    spec = {"name": name, "model": model, "seed": seed, "optim": {"name": optimizer, "lr": 1e-3},
            "prune": {"method": pruning, "target": target, "variant": variant}}
    memory = {"peak_rss_bytes": 400 * 2**20 + seed * 2**20,
              "state_bytes": {"weights": 2**20, "gradients": 2**20, "optimizer_state": 2 * 2**20,
                              "pruning_buffers": 2**18 if pruning != "none" else 0}}
    if not accuracy:
        memory.update(cuda_max_allocated_bytes=1000 * 2**20, cuda_max_reserved_bytes=1200 * 2**20)
    summary = {
        "name": name, "status": "ok", "error": None, "flags": [], "metric": metric,
        "best": {"step": 20, "val": {"loss": 0.5, metric["name"]: vals[1]}},
        "test_at_best": {"step": 20, "loss": 0.6, metric["name"]: test},
        "sparsity": {"target": target, "reached": target, "prunable_params": 1000, "total_params": 1100},
        "steps": {"planned": 30, "done": 30, "evaluations": 3}, "memory": memory,
        "throughput": {"unit": "images/s" if accuracy else "tokens/s", "value": 1234.5},
        "mfu": None if accuracy else {"value": 0.412, "gpu": "H100"},  # the GPU runs: MFU measured
        "wall_time_s": 12.5, "spec": spec, "started_at": "2025-01-01T00:00:00",
    }
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    metrics = [{"step": s, "epoch": s / 10, "lr": 1e-3 / (i + 1), "train_loss": 2.0 - 0.3 * i,
                "val": {"loss": 1.0 - 0.1 * i, metric["name"]: v}, "sparsity": target * min(1, s / 20),
                "target_sparsity_now": target * min(1, s / 20), "elapsed_s": s * 0.1}
               for i, (s, v) in enumerate(zip(STEPS, vals, strict=True))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    curve = []
    for s in range(5, 35, 5):
        rec = {"step": s, "loss": 2.5 - s * 0.03 + seed * 0.01, "lr": 1e-3 * (1 - s / 40),
               "sparsity": target * min(1, s / 20), "elapsed_s": s * 0.1, "rss_bytes": (350 + s + seed) * 2**20}
        if not accuracy:
            rec["cuda_allocated_bytes"] = (900 + s) * 2**20
        curve.append(rec)
    (run_dir / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
    RunCheckpoints(run_dir).folder.mkdir()
    RunCheckpoints(run_dir).best.write_bytes(b"not a real checkpoint")
    (run_dir / "log.txt").write_text("training log\n")
    return summary


def build(folder: Path, *tables: dict, seeds: tuple[int, ...] = SEEDS) -> Path:
    """A results folder with every run of ``tables`` (default: the accuracy table), as `make` writes it."""
    folder.mkdir(parents=True)
    runs = []
    for table in tables or (ACCURACY,):
        for key, values in table.items():
            for seed, value in zip(seeds, values, strict=False):
                runs.append(write_run(folder, key, seed, value))
    command = "make MAX_ITERS=30 SEEDS=2"
    names = [r["name"] for r in runs]
    (folder / "matrix.json").write_text(json.dumps({"created": "2025-01-01T00:00:00", "command": command,
                                                    "runs": names}))
    (folder / "config.txt").write_text("CONFIG_MODEL_LENET5=y\nCONFIG_MAX_ITERS=30\n")
    (folder / "summary.json").write_text(json.dumps({"folder": folder.name, "command": command,
                                                     "created": "2025-01-01T00:00:00", "runs": runs}))
    return folder


def set_run(folder: Path, name: str, **changes: object) -> None:
    """Change fields of one run, in its own summary.json and in the folder's summary.json."""
    path = folder / "summary.json"
    data = json.loads(path.read_text())
    for run in data["runs"]:
        if run["name"] == name:
            run.update(changes)
            (folder / name / "summary.json").write_text(json.dumps(run))
    path.write_text(json.dumps(data))
