"""lib/checkpoint: exact resume after real faults (issue 11).

The fault tests run `python -m lib.train.run` in real subprocesses and SIGKILL or SIGTERM them; the resumed
run must end bit-identical to an uninterrupted one: every milestone checkpoint (model, optimizer,
pruner, RNG), every logged metric, and the summary's results. A checkpoint of another run is refused.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lib.checkpoint import CheckpointError, load
from lib.checkpoint.compare import logs, run_differences
from tests.conftest import PY, ROOT, folder_states, tiny_spec

STEPS = 40


def spec_for(name: str, pruning: str = "magnitude", optimizer: str = "adamw", **kw):
    sparsity = 0.0 if pruning == "none" else 0.7
    if pruning == "state":
        optimizer = "adamwprune"
    train = {"log_interval": 1, "ckpt_interval": 4, "ckpt_milestone": 4, "prune": {"end": 24}, **kw}
    return tiny_spec(name, optimizer=optimizer, pruning=pruning, sparsity=sparsity, max_iters=STEPS, **train)


def start(run_dir: Path, spec, patch: str = "") -> subprocess.Popen:
    """`python -m lib.train.run run_dir`, optionally after ``patch`` (Python run first, in the child)."""
    if not (run_dir / "spec.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        spec.write(run_dir / "spec.json")
    code = f"{patch}\nimport sys\nfrom lib.train.run import main\nsys.exit(main([{str(run_dir)!r}]))"
    return subprocess.Popen([PY, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(run_dir: Path, spec, patch: str = "") -> subprocess.CompletedProcess:
    proc = start(run_dir, spec, patch)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def steps_logged(run_dir: Path) -> int:
    try:
        return len((run_dir / "train.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 120
    while steps_logged(run_dir) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the run did not get there"
        time.sleep(0.005)


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Bit-identical: every milestone's tensors and counters, every logged metric, the summary's results."""
    assert (reference / "checkpoints" / "milestones").is_dir()
    assert run_differences(reference, resumed) == []


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per method, shared by the fault tests."""
    base = tmp_path_factory.mktemp("reference")
    runs = {}
    for method in ("none", "magnitude", "movement", "state"):
        done = finish(base / method, spec_for(method, pruning=method))
        assert done.returncode == 0, done.stdout
        runs[method] = base / method
    return runs




@pytest.mark.parametrize("method, seed", [("none", 1), ("magnitude", 2), ("movement", 3), ("state", 4),
                                          ("magnitude", 5)])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(references, tmp_path, method, seed):
    run_dir = tmp_path / method
    spec = spec_for(method, pruning=method)
    kill_at = random.Random(seed).randint(3, STEPS - 6)
    proc = start(run_dir, spec)
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    done = finish(run_dir, spec)
    assert done.returncode == 0, done.stdout
    assert "resuming" in done.stdout
    assert_same_run(references[method], run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"]["count"] == 1 and summary["resumed"]["from_steps"][0] % 4 == 0
    assert not list((run_dir / "checkpoints").glob("step_*.ckpt"))  # a finished run drops its training ones


def test_adamwspam_resumes_exactly_across_a_moment_reset(tmp_path):
    """SPAM resets the moments every `interval` steps: kill after a reset, resume from before it."""
    spec = spec_for("spam", pruning="none", optimizer="adamwspam")
    spec = dataclasses.replace(spec, optim=dataclasses.replace(spec.optim, spam_interval=10, spam_warmup=3))
    reference = tmp_path / "reference"
    assert finish(reference, spec).returncode == 0
    run_dir = tmp_path / "resumed"
    proc = start(run_dir, spec)
    wait_for_step(proc, run_dir, 27)  # the newest checkpoint is step 24 or later: resets at 30 lie ahead
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = finish(run_dir, spec)
    assert done.returncode == 0, done.stdout
    assert "resuming" in done.stdout  # not trained again from step 0 ...
    (resumed_at,) = json.loads((run_dir / "summary.json").read_text())["resumed"]["from_steps"]
    assert 24 <= resumed_at < 30  # ... but from a checkpoint before the reset at step 30
    assert_same_run(reference, run_dir)
    spam = load(reference / "checkpoints" / "milestones" / "step_00000036.ckpt")["optimizer"]["spam"]
    assert spam["last_reset"] == 30  # the run really crossed a reset after the resume


SLOW_WRITE = """
import time
import lib.checkpoint.format as fmt
_sha256 = fmt._sha256
def slow(fd, size, start=0):
    time.sleep(0.3)  # the payload is in the temporary file, its checksum not yet
    return _sha256(fd, size, start)
fmt._sha256 = slow
"""


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(references, tmp_path):
    run_dir = tmp_path / "magnitude"
    spec = spec_for("magnitude")
    proc = start(run_dir, spec, SLOW_WRITE)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 120
    while not ((ckpts / "latest").exists() and list(ckpts.glob(".step_*.tmp"))):  # the second one is being written
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (ckpts / "latest").read_text().strip()
    assert load(ckpts / latest)["step"] == int(latest[5:13])  # whole and verified
    done = finish(run_dir, spec)
    assert done.returncode == 0, done.stdout
    assert not list(ckpts.glob(".*.tmp"))
    assert_same_run(references["magnitude"], run_dir)


def test_sigterm_writes_a_checkpoint_at_the_end_of_the_step_and_resumes(references, tmp_path):
    run_dir = tmp_path / "movement"
    spec = spec_for("movement", pruning="movement", ckpt_interval=0)  # no periodic checkpoint: only the signal's
    proc = start(run_dir, spec)
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4, out
    assert "stopped by SIGTERM after step" in out and "make continue" in out
    assert not (run_dir / "summary.json").exists()
    assert folder_states(tmp_path, run_dir.name) == ("stopped", "stopped", "1 stopped")  # never "1 failed"
    (stopped_at,) = [int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step_*.ckpt")]
    assert stopped_at >= 10
    done = finish(run_dir, spec)
    assert done.returncode == 0, done.stdout
    ref = json.loads((references["movement"] / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert "resuming" in done.stdout and got["resumed"] == {"count": 1, "from_steps": [stopped_at]}  # not from 0
    for key in ("best", "test_at_best", "sparsity", "steps"):
        assert ref[key] == got[key], key
    assert logs(references["movement"]) == logs(run_dir)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    from lib.checkpoint import state as ckpt_state

    spec = spec_for("a")
    resumed = tmp_path / "run"
    proc = start(resumed, spec)
    wait_for_step(proc, resumed, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    payload = load(resumed / "checkpoints" / "step_00000004.ckpt")
    other_optimizer = {**spec.to_dict(), "optim": {**spec.to_dict()["optim"], "name": "sgd"}}
    with pytest.raises(CheckpointError, match=r"another RunSpec \(optim differ; optim: .*'adamw'.* vs .*'sgd'"):
        ckpt_state.check_spec(payload["spec"], other_optimizer, Path("x"))
    with pytest.raises(CheckpointError, match="is of model 'lenet5', this run trains 'gpt2'"):
        ckpt_state.check_spec(payload["spec"], {**spec.to_dict(), "model": "gpt2"}, Path("x"))
    # the same spec but a model whose shapes differ: one line naming the mismatch
    from tests.conftest import small_conv_net

    model = small_conv_net()
    optimizer = torch.optim.AdamW(model.parameters())
    from lib.pruning import build_pruner

    pruner = build_pruner(model, optimizer, spec.prune)
    with pytest.raises(CheckpointError, match="does not fit this run: "):
        ckpt_state.restore(payload, Path("x"), payload["spec"], model, optimizer, pruner,
                           torch.amp.GradScaler("cpu", enabled=False))
    # and through lib.train.run: the run fails with that one line, the checkpoint stays for inspection
    spec_file = resumed / "spec.json"
    spec_file.write_text(json.dumps(other_optimizer))
    done = finish(resumed, None)
    assert done.returncode == 1
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "failed" and "another RunSpec" in summary["error"]
    assert (resumed / "checkpoints" / "step_00000004.ckpt").exists()
