"""Shared test helpers: writing .config files the way the Makefile does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import kconfiglib
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Every process the suite starts inherits this mark, so the last test can find any that outlived its test.
SESSION_MARK = "PRUNING_HARNESS_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's spread pass: the workers share the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def resolve_defconfig(lines: str, out: Path) -> Path:
    """Expand defconfig-style ``lines`` into a full .config at ``out`` (like `make defconfig-x`)."""
    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    src = out.with_suffix(".defconfig")
    src.write_text(lines)
    kconf.load_config(str(src))
    assert not [w for w in kconf.warnings if "undefined" in w], kconf.warnings
    kconf.write_config(str(out), save_old=False)
    return out


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(defconfig_lines, extra_raw_lines="") -> path of a .config.

    ``extra_raw_lines`` are edited into the file afterwards, as a user editing it would: each replaces the
    symbol's own line, and a choice member set to y unsets the member chosen before (the reader refuses a file
    that sets one symbol twice or two members of one choice).
    """

    def _make(lines: str = "", extra: str = "") -> Path:
        path = resolve_defconfig(lines, tmp_path / ".config")
        if extra:
            path.write_text(edit_config(path.read_text(), extra))
        return path

    return _make


def edit_config(text: str, extra: str) -> str:
    """``text`` with the setting lines of ``extra`` in place of the lines they change (others appended)."""
    from lib.config.kconf import SETTING_LINE

    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    siblings = {sym.name: [s.name for s in choice.syms] for choice in kconf.unique_choices for sym in choice.syms}
    lines = text.splitlines()
    for line in extra.splitlines():
        match = SETTING_LINE.match(line.strip())
        if not match:
            lines.append(line)
            continue
        name = match[1] or match[3]
        unset = set(siblings.get(name, [])) - {name} if match[2] == "y" else set()
        kept = []
        for old in lines:
            found = SETTING_LINE.match(old.strip())
            if found and (found[1] or found[3]) == name:
                continue
            if found and found[1] in unset:
                old = f"# CONFIG_{found[1]} is not set"
            kept.append(old)
        lines = kept + [line]
    return "\n".join(lines) + "\n"


def trained_run(folder: Path, spec, *, in_subprocess: bool = False) -> Path:  # noqa: ANN001 (a RunSpec)
    """Train ``spec`` into ``folder``/<its name> and return that run folder (it must end ok): in-process, or
    with ``in_subprocess`` as make runs it (`python -m lib.train.run`), its stdout kept in folder/stdout.txt."""
    from lib.train import run as run_mod

    run_dir = folder / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    if not in_subprocess:
        assert run_mod.run(run_dir) == 0
        return run_dir
    done = subprocess.run([sys.executable, "-m", "lib.train.run", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder / "stdout.txt").write_text(done.stdout)
    return run_dir


def tiny_spec(name: str = "t", *, optimizer: str = "adamw", lr: float = 3e-3, pruning: str = "none",
              sparsity: float = 0.0, max_iters: int = 20, seed: int = 1, **train_kw):
    """A small LeNet-5 RunSpec that trains in about a second on the CPU."""
    from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings

    train = {"batch_size": 64, "max_iters": max_iters, "eval_interval": 5, "log_interval": 5, **train_kw}
    prune = {"method": pruning, "target": sparsity, "start": 2, "end": 10, "frequency": 2}
    prune.update(train.pop("prune", {}))
    return RunSpec(
        name=name, model="lenet5", seed=seed,
        optim=OptimSettings(optimizer, lr, 0.0),
        prune=PruneSettings(**prune),
        train=TrainSettings(**train),
        hardware=HardwarePlan(device="cpu", micro_batch=32, grad_accum=2, threads=1),
        model_options={"dataset": "mnist5k"},
        data_dir=str(ROOT / "data"),
    )


VOCAB = 64  # synthetic tests: a tiny vocabulary keeps the output head cheap


def markov_tokens(n: int, seed: int):  # noqa: ANN201 (an int64 numpy array)
    import numpy as np

    """A learnable stream: mostly next = 5 * prev + 3 (mod VOCAB), sometimes a random token."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    noise = rng.random(n) < 0.1
    random_ids = rng.integers(0, VOCAB, n)
    for i in range(1, n):
        out[i] = random_ids[i] if noise[i] else (5 * out[i - 1] + 3) % VOCAB
    return out


def synthetic_spec(tmp_path: Path, name: str = "gpt2_tiny", max_iters: int = 30, **train: object):  # noqa: ANN201
    """A tiny-GPT RunSpec over synthetic shards written into tmp_path (dataset "text", never prepared from files)."""
    from gpt2.prepare import shard_dir, write_shards
    from gpt2.sources import source_of
    from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings

    text_dir = tmp_path / "synthetic"
    options = {"size": "tiny", "dataset": "text", "block_size": 16, "vocab_size": VOCAB, "token_budget": 10**6,
               "text_dir": str(text_dir)}
    out = shard_dir(tmp_path / "data", "text")
    if not (out / "meta.json").exists():
        write_shards(out, {"train": markov_tokens(20_000, 1), "val": markov_tokens(2_000, 2),
                           "test": markov_tokens(2_000, 3)},
                     dataset="text", source=source_of("text", text_dir), token_budget=10**6)
    settings = {"batch_size": 16, "max_iters": max_iters, "eval_interval": 10, "log_interval": 10,
                "eval_batches": 16, **train}
    return RunSpec(name=name, model="gpt2", seed=1, optim=OptimSettings("adamw", 3e-3, 0.0), prune=PruneSettings(),
                   train=TrainSettings(**settings),
                   hardware=HardwarePlan(device="cpu", micro_batch=8, grad_accum=2, threads=1),
                   model_options=options, data_dir=str(tmp_path / "data"))


class SmallConvNet(torch.nn.Module):
    """A conv + two Linear layers on 1x8x8 inputs: small enough for hand-checked pruning tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc1 = torch.nn.Linear(4 * 6 * 6, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def small_conv_net(seed: int = 0) -> SmallConvNet:
    torch.manual_seed(seed)
    return SmallConvNet()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run after all the others."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu-on-cpu", action="store_true",
                     help="run the tests marked gpu on the CPU (their CUDA-only checks skip): to check those tests "
                          "themselves where no GPU is")
    parser.addoption(
        "--fused-step", choices=("as-built", "on", "off"), default="as-built",
        help="force AdamWPrune's fused masked step on or off in every test (make test runs the pruning tests "
             "both ways); as-built: each test's own setting (the class default off, the plan's choice in runs)")


@pytest.fixture(autouse=True)
def _forced_fused_step(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --fused-step on/off, every AdamWPrune reads ``fused`` as that value and ignores assignments."""
    mode = request.config.getoption("--fused-step")
    if mode == "as-built":
        return
    from lib.optim.adamwprune import AdamWPrune

    forced = mode == "on"
    monkeypatch.setattr(AdamWPrune, "fused", property(lambda self: forced, lambda self, value: None), raising=False)


def folder_states(folder: Path, name: str) -> tuple[str, str, str]:
    """The run's state as `make status`, summary.json and report.md's totals each name it."""
    from lib import matrix
    from lib.matrix.executors import status

    (folder / "matrix.json").write_text(json.dumps({"created": "2026-12-06T00:00:00", "command": "make",
                                                    "runs": [name]}))
    record = matrix.write_summary(folder)[0]
    total = (folder / "report.md").read_text().split("run(s): ", 1)[1].split(".", 1)[0]
    return status.states(folder, [name])[0][1], record["status"], total
