"""lib/checkpoint: the file format, the manager, and exact resume after real faults (issue 11).

The fault tests run `python -m lib.train.run` in real subprocesses and SIGKILL or SIGTERM them; the resumed
run must end bit-identical to an uninterrupted one: every milestone checkpoint (model, optimizer,
pruner, RNG), every logged metric, and the summary's results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.checkpoint import CheckpointError, load, save
from lib.checkpoint.compare import logs, run_differences
from lib.checkpoint.manager import Manager, Policy
from lib.core.files import DiskFullError
from lib.core.task import get_task
from tests.conftest import PY, ROOT, folder_states, tiny_spec, trained_run

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
_write = fmt._HashingWriter.write
def slow(self, data):
    time.sleep(0.02)
    return _write(self, data)
fmt._HashingWriter.write = slow
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


# --- the file format and the manager, in-process ----------------------------------------------------------


def test_damaged_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "step_00000004.ckpt"
    save(path, {"w": torch.arange(1000.0), "step": 4})
    data = path.read_bytes()
    for damage, message in ((data[: len(data) // 2], "is truncated"),
                            (data[:200] + bytes([data[200] ^ 1]) + data[201:], "fails its SHA-256 check")):
        path.write_bytes(damage)
        with pytest.raises(CheckpointError, match=message) as caught:
            load(path)
        assert "\n" not in str(caught.value)


def test_a_verified_file_that_is_not_a_torch_payload_is_one_line(tmp_path):
    import hashlib

    from lib.checkpoint.format import MAGIC
    from lib.core.errors import first_line

    path, data = tmp_path / "odd.ckpt", b"not a torch file at all"
    path.write_bytes(data + MAGIC + f"{len(data):020d}".encode() + hashlib.sha256(data).hexdigest().encode() + b"\n")
    with pytest.raises(CheckpointError, match=f"refused to load {path}") as caught:
        load(path)
    assert "\n" not in str(caught.value)
    assert first_line(ValueError()) == "ValueError" and first_line(ValueError("a\nb")) == "a"


def test_a_pickled_code_object_is_refused(tmp_path):
    from lib.checkpoint.format import load_payload

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "hook": os.system}, evil)
    with pytest.raises(CheckpointError, match=r"refused to load .* pickled objects beyond tensors.*posix.system"):
        load_payload(evil, evil)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    said = []
    manager = Manager(tmp_path, Policy(interval=1, keep_last=3), say=said.append)
    for step in (1, 2, 3):
        manager.save(step, {"step": step})
    newest = tmp_path / "step_00000003.ckpt"
    newest.write_bytes(newest.read_bytes()[:-5])
    path, payload = manager.latest()
    assert payload["step"] == 2 and path.name == "step_00000002.ckpt"
    assert len(said) == 1 and "step_00000003.ckpt is truncated" in said[0] and "trying the one before" in said[0]
    for p in manager.steps():
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*move that folder away"):
        manager.latest()


def test_keep_last_and_milestones(tmp_path):
    manager = Manager(tmp_path, Policy(interval=1, keep_last=2, milestone_every=3))
    for step in range(1, 8):
        manager.save(step, {"step": step})
    assert [p.name for p in manager.steps()] == ["step_00000006.ckpt", "step_00000007.ckpt"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000007.ckpt"
    assert sorted(p.name for p in (tmp_path / "milestones").iterdir()) == ["step_00000003.ckpt",
                                                                         "step_00000006.ckpt"]
    with pytest.raises(CheckpointError, match="keep at least 1"):
        Policy(keep_last=0)


def test_a_failing_writer_leaves_latest_unchanged(tmp_path, monkeypatch):
    import errno

    manager = Manager(tmp_path, Policy(interval=1, keep_last=3))
    manager.save(1, {"step": 1, "w": torch.zeros(10)})

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"disk full writing .*step_00000002.ckpt \("):
        manager.save(2, {"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_00000001.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001.ckpt"]
    assert manager.latest()[1]["step"] == 1


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


def test_keep_last_zero_in_config_is_one_line(make_config):
    from lib import config
    from lib.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"CONFIG_CKPT_KEEP_LAST=0 is outside its range \[1, 1000\]"):
        config.load(make_config("", "CONFIG_CKPT_KEEP_LAST=0\n"))
    with pytest.raises(ConfigError, match="CONFIG_CKPT_TIME='5' has no unit"):
        config.load(make_config("", 'CONFIG_CKPT_TIME="5"\n'))


def test_continue_without_spec_json_is_one_line(tmp_path):
    from lib import matrix
    from lib.core.errors import HarnessError

    folder = tmp_path / "t_20250101_000000"
    (folder / "run0").mkdir(parents=True)
    (folder / "matrix.json").write_text(json.dumps({"created": "2025-01-01T00:00:00", "runs": ["run0"]}))
    with pytest.raises(HarnessError, match=r"run0/spec.json is missing, so that run cannot be \(re\)started"):
        matrix.run_folder(folder, 1, only_unfinished=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --- export -------------------------------------------------------------------------------------------------


def test_export_is_safetensors_with_exact_zeros_and_evaluates_the_same(tmp_path):
    from safetensors.torch import load_file

    from lib import cli
    from lib.checkpoint.export import load_export
    from lib.core.task import get_task
    from lib.train import run as run_mod

    spec = tiny_spec("pruned", pruning="magnitude", sparsity=0.7, max_iters=30, prune={"end": 20})
    run_dir = tmp_path / "pruned"
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert run_mod.run(run_dir) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert cli.main(["export", "--run", str(run_dir)]) == 0
    for name in ("model.safetensors", "model_card.json"):  # the umask's mode, not safetensors' 0600
        assert (run_dir / "export" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card["structure"]["reduction"] == 0 and card["structure"]["parameters_now"] == 61706  # nothing cut
    assert card["provenance"]["data"] == summary["provenance"]["data"]  # the split's hash travels with the model
    assert "zero-padded by 2 pixels" in card["usage"]["input"] and "max-pool" in card["usage"]["forward"]
    assert card["checkpoint_step"] == summary["best"]["step"] and card["test_at_checkpoint"] == summary["test_at_best"]
    assert card["made_by"]["commit"] and card["sparsity"]["prunable_reached"] == summary["sparsity"]["reached"]
    weights = [n for n in card["shapes"] if n.endswith("weight")]  # LeNet-5's prunable tensors: every weight
    numel = {n: math.prod(card["shapes"][n]) for n in weights}
    pruned = sum(card["sparsity"]["per_layer"][n] * numel[n] for n in weights) / sum(numel.values())
    assert abs(pruned - 0.7) < 0.005, pruned  # one global threshold: layers differ, the whole is at target
    weights = load_file(run_dir / "export" / "model.safetensors")
    best = load(run_dir / "checkpoints" / "best.pt")
    for name, packed in best["pruner"]["masks"].items():
        from lib.optim.bitmask import unpack

        keep = packed if packed.dtype == torch.bool else unpack(packed, weights[name].shape)
        assert torch.count_nonzero(weights[name][~keep.bool()]) == 0, name  # pruned: exactly zero
    model, loaded_spec = load_export(run_dir / "export")
    with torch.no_grad():
        again = get_task("lenet5").evaluate(model.eval(), loaded_spec, "test")
    assert again["accuracy"] == summary["test_at_best"]["accuracy"] and again["loss"] == summary["test_at_best"]["loss"]


def test_tied_gpt2_weights_survive_an_export_round_trip(tmp_path):
    """Through the harness's own export (`make export`) and loader: a short tiny-GPT run, pruned."""
    from safetensors import safe_open

    from lib.checkpoint.export import export, load_export
    from tests.test_gpt2 import VOCAB, synthetic_spec

    spec = synthetic_spec(tmp_path, max_iters=12, eval_interval=6)
    spec = dataclasses.replace(spec, prune=dataclasses.replace(spec.prune, method="magnitude", target=0.5, start=2,
                                                               end=8, frequency=2))
    run_dir = trained_run(tmp_path, spec)
    out = export(run_dir)
    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        names = set(stored.keys())
    assert len({"wte.weight", "lm_head.weight"} & names) == 1  # the shared table is stored once
    model, _ = load_export(out)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()  # and tied again on loading
    best = load(run_dir / "checkpoints" / "best.pt")["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best[name]), name
    assert any(float((p == 0).float().mean()) > 0.4 for p in model.parameters())  # the pruned model, not a fresh one
    idx = torch.randint(0, VOCAB, (2, 16))
    trained = get_task("gpt2").build_model(spec)
    trained.load_state_dict(best)
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), trained.eval()(idx))


@pytest.mark.parametrize("setup, message", [
    ("no_best", "has no best checkpoint"),
    ("not_a_run", "not a run folder (no spec.json)"),
    ("no_run", "export needs a run folder"),
])
def test_export_bad_input_is_one_line(tmp_path, capsys, setup, message):
    from lib import cli

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    if setup == "no_best":
        tiny_spec("r").write(run_dir / "spec.json")
        (run_dir / "summary.json").write_text(json.dumps({"status": "ok"}))
    argv = ["export"] + ([] if setup == "no_run" else ["--run", str(run_dir)])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
