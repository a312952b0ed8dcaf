"""The executors (lib/matrix/executors/) against a real one-node Slurm (scripts/local_slurm.sh; .ci/run starts it).

The LeNet-5 matrix through Slurm ends as it does locally; a job signalled with SIGUSR1 mid-run is requeued
and resumes from its checkpoint to the weights of an uninterrupted run, also as a 2-rank job of 2 tasks; a
failed job leaves the others alone and `make continue` (with either executor) reruns only it; the sbatch
parameters of a DDP run on a made-up 8-GPU node and of a 4-node job; every bad input in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib import checkpoint, cli, config, matrix
from lib.checkpoint.folder import RunCheckpoints
from lib.core.errors import HarnessError
from lib.core.spec import RunSpec
from lib.hardware import Devices
from lib.matrix.executors import LocalExecutor
from lib.matrix.executors.slurm import SlurmExecutor, job_id
from lib.matrix.executors.status import states
from lib.train import distributed
from tests.conftest import ROOT, tiny_spec, trained_run

CPU = Devices("cpu", cpu_cores=2)
LENET = ("CONFIG_MODEL_LENET5=y\nCONFIG_LENET5_DATASET_MNIST5K=y\nCONFIG_OPTIMIZER_ADAMW=y\nCONFIG_EPOCHS=0\n"
         "CONFIG_DEVICE_CPU=y\nCONFIG_EXECUTOR_SLURM=y\nCONFIG_SLURM_CPUS_PER_RUN=1\nCONFIG_MATRIX_JOBS=2\n")
TWO_RUNS = "CONFIG_PRUNING_MULTIPLE=y\nCONFIG_PRUNING_ENABLE_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY=\"0.5\"\n"


@pytest.fixture(scope="module")
def cluster() -> None:
    """A Slurm cluster that already answers (.ci/run starts one with `make slurm-up`). Tests never install or
    start one: that would change the machine."""
    if not shutil.which("sinfo"):
        pytest.skip("no Slurm here: `sudo make slurm-up` installs and starts a one-node cluster (.ci/run does)")
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=60).returncode:
        pytest.skip("Slurm is installed but its controller does not answer: `sudo make slurm-up` starts it")


def _config(make_config, tmp_path: Path, lines: str) -> Path:
    return make_config(LENET + lines + f"CONFIG_RESULTS_DIR=\"{tmp_path / 'results'}\"\n")


def _newest(tmp_path: Path) -> Path:
    return sorted((tmp_path / "results").iterdir())[-1]


def _outcome(folder: Path) -> dict[str, tuple]:
    runs = json.loads((folder / "summary.json").read_text())["runs"]
    return {r["name"]: (r["status"], r["best"], r["test_at_best"], r["sparsity"]["reached"]) for r in runs}


def test_the_lenet_matrix_through_slurm_ends_as_it_does_locally(cluster, make_config, tmp_path: Path) -> None:
    path = _config(make_config, tmp_path, TWO_RUNS + "CONFIG_MAX_ITERS=20\n")
    assert cli.main(["run", "--config", str(path)]) == 0
    on_slurm = _newest(tmp_path)
    assert all(job_id(on_slurm / name) for name in matrix.run_names(on_slurm))  # each run was a Slurm job
    assert "[slurm job" in (on_slurm / "lenet5_adamw_magnitude_50" / "log.txt").read_text()
    assert cli.main(["run", "--config", str(path), "--executor", "local"]) == 0
    local = _newest(tmp_path)
    assert local != on_slurm and _outcome(local) == _outcome(on_slurm)
    assert cli.main(["run", "--config", str(path), "--set", "SLURM_ARRAY=y"]) == 0
    array = _newest(tmp_path)
    ids = [job_id(array / name) for name in matrix.run_names(array)]
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)  # one array, one element per run
    assert _outcome(array) == _outcome(on_slurm)
    assert {state for _, state, _ in states(on_slurm, matrix.run_names(on_slurm))} == {"ok"}


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_signalled_job_is_requeued_and_resumes_to_an_uninterrupted_runs_weights(cluster, make_config,
                                                                                    tmp_path: Path, ranks: int) -> None:
    """With 2 ranks the job has 2 tasks (the multi-node path, issue 30: one task per rank, the rendezvous from
    Slurm's environment, no torchrun): Slurm signals both, rank 0's task requeues, and the resumed job is the
    uninterrupted 2-rank run (started by torchrun here) to the bit."""
    steps, signal_after = (400, r"step [1-9]\d{2}/400") if ranks == 1 else (120, r"step ([2-9]\d|1\d\d)/120")
    path = _config(make_config, tmp_path, "CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY=\"0.5\"\n"
                                          f"CONFIG_MAX_ITERS={steps}\nCONFIG_SLURM_WAIT=n\nCONFIG_RANKS_PER_NODE={ranks}\n")
    assert cli.main(["run", "--config", str(path)]) == 0  # submitted, not waited for
    folder = _newest(tmp_path)
    run_dir = folder / matrix.run_names(folder)[0]
    log = run_dir / "log.txt"
    with pytest.raises(HarnessError, match=r"is still a Slurm job \d+ (PENDING|RUNNING) \(1 run\(s\) of"):
        matrix.run_folder(folder, 1, only_unfinished=True, executor=LocalExecutor())  # no second trainer
    _wait_for(lambda: log.exists() and re.search(signal_after, log.read_text()), signal_after)
    job = job_id(run_dir)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait_for(lambda: "stopped by SIGUSR1" in log.read_text(), "the checkpoint on SIGUSR1")
    _wait_for(lambda: states(folder, [run_dir.name])[0][1] == "stopped", "the requeue")
    _wait_for(lambda: (run_dir / "summary.json").exists(), "the resumed job to finish", timeout=240)
    text = log.read_text()
    assert text.count(f"[slurm job {job} ") == 2 and re.search(r"resuming \S+ from step_\d+\.ckpt", text)
    parameters = json.loads((run_dir / "slurm.json").read_text())["parameters"]
    assert (parameters["nodes"], parameters["ntasks_per_node"]) == (1, ranks)  # one task per rank
    assert (f" x {ranks} tasks]" in text) == (ranks > 1) and "torch.distributed.run" not in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    (tmp_path / "reference").mkdir()
    spec = RunSpec.read(run_dir / "spec.json")
    assert spec.hardware.world_size == ranks
    if ranks == 1:
        reference = trained_run(tmp_path / "reference", spec)
    else:  # the same run under torchrun on this machine
        reference = tmp_path / "reference" / spec.name
        reference.mkdir()
        spec.write(reference / "spec.json")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(distributed.launch_command(spec.hardware, reference), cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=300)
    ours = checkpoint.load(RunCheckpoints(run_dir).best)["model"]
    theirs = checkpoint.load(RunCheckpoints(reference).best)["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _two_runs(make_config, tmp_path: Path, broken: int, damage) -> tuple:  # noqa: ANN001
    """A results folder of two LeNet-5 runs, run ``broken``'s spec.json damaged by ``damage(text) -> text``;
    returns (executor settings, folder, run names, restore) where restore() puts the spec back."""
    cfg = config.load(_config(make_config, tmp_path, TWO_RUNS + "CONFIG_MAX_ITERS=20\n"))
    specs = matrix.expand(cfg, CPU)
    folder = matrix.create_results_folder(cfg, specs, "test")
    path = folder / specs[broken].name / "spec.json"
    good = path.read_text()
    path.write_text(damage(good))
    return cfg.executor, folder, [s.name for s in specs], lambda: path.write_text(good)


def _unprepared(text: str) -> str:
    data = json.loads(text)
    data["model_options"]["dataset"], data["data_dir"] = "mnist", "/nonexistent/data"  # a dataset not prepared
    return json.dumps(data)


def test_a_failed_job_leaves_the_others_and_continue_reruns_only_it(cluster, make_config, tmp_path: Path) -> None:
    settings, folder, names, restore = _two_runs(make_config, tmp_path, 1, _unprepared)
    runs = matrix.run_folder(folder, 2, executor=SlurmExecutor(settings))
    assert [r["status"] for r in runs] == ["ok", "failed"] and "prepare-data" in runs[1]["error"]
    first = job_id(folder / names[0])
    restore()
    runs = matrix.run_folder(folder, 2, only_unfinished=True, executor=LocalExecutor())  # finished locally
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert job_id(folder / names[0]) == first  # the ok run was not run again


def test_a_matrix_started_locally_is_finished_on_slurm(cluster, make_config, tmp_path: Path) -> None:
    settings, folder, names, restore = _two_runs(make_config, tmp_path, 0, lambda text: "{damaged")
    runs = matrix.run_folder(folder, 2, executor=LocalExecutor())
    assert [r["status"] for r in runs] == ["failed", "ok"]
    restore()
    runs = matrix.run_folder(folder, 2, only_unfinished=True, executor=SlurmExecutor(settings))
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert job_id(folder / names[0]) and not job_id(folder / names[1])  # only the failed one went to Slurm


@pytest.mark.parametrize(("line", "message"), [
    ("CONFIG_SLURM_EXTRA=\"constraint=h100\"", "CONFIG_SLURM_EXTRA: 'constraint=h100' is not an sbatch option like "
                                               "--constraint=h100"),
    ("CONFIG_SLURM_TIME=\"4\"", "CONFIG_SLURM_TIME='4' has no unit: write 4s, 4m or 4h"),
])
def test_bad_slurm_settings_are_one_line(make_config, line: str, message: str) -> None:
    from lib.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.load(make_config(f"CONFIG_MODEL_LENET5=y\n{line}\n"))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_sbatch_parameters_of_a_ddp_run_on_a_made_up_8_gpu_node(make_config, capsys) -> None:
    path = make_config((ROOT / "defconfigs" / "gpt2-finewebedu-bitter7").read_text() + "CONFIG_EXECUTOR_SLURM=y\n"
                       "CONFIG_SLURM_PARTITION=\"gpu\"\nCONFIG_SLURM_ACCOUNT=\"lab\"\nCONFIG_SLURM_MEM_GB=400\n"
                       "CONFIG_SLURM_EXTRA=\"--constraint=h100 --exclusive\"\n")
    assert cli.main(["dry-run", "--config", str(path), "--gpus", "8x NVIDIA H100 80GB HBM3:80"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("sbatch for "):].split("sbatch for ")[1].splitlines()
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --mem=400GB", "#SBATCH --constraint=h100", "#SBATCH --exclusive",
                 "#SBATCH --signal=USR1@120", "#SBATCH --time=240", "#SBATCH --nodes=1"):
        assert f"  {line}" in block, line
    assert "x8=" in out  # the plan is DDP over the node's 8 GPUs


def test_a_four_node_job_on_a_made_up_gpu_partition_in_dry_run(make_config, capsys) -> None:
    """Issue 30: one job spans the nodes, one task per rank (its srun line), 4 x 8 A10G ranks."""
    path = make_config((ROOT / "defconfigs" / "gpt2-finewebedu-bitter7").read_text() + "CONFIG_EXECUTOR_SLURM=y\n"
                       "CONFIG_SLURM_PARTITION=\"gpu\"\nCONFIG_DIST_MULTINODE=y\nCONFIG_DIST_NNODES=4\n")
    assert cli.main(["dry-run", "--config", str(path), "--gpus", "8x NVIDIA A10G:24"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("sbatch for "):].split("sbatch for ")[1].splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu"):
        assert f"  {line}" in block, line
    assert any(line.startswith("  srun --unbuffered") for line in block)
    assert "x32=" in out and "x 4 nodes" in out  # 32 ranks: 8 GPUs on each of 4 nodes


def _cli_error(args: list[str], env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "lib.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def _fake_slurm(folder: Path, said: str) -> dict:
    """An environment whose only Slurm commands are scripts that print ``said`` and fail, as each does when the
    controller is down."""
    folder.mkdir()
    for tool in ("sbatch", "srun", "squeue", "sinfo"):
        (folder / tool).write_text(f"#!/bin/sh\necho '{said}' >&2\nexit 1\n")
        (folder / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{Path(sys.executable).parent}"}


def test_without_slurm_or_its_controller_every_slurm_path_is_one_line(make_config, tmp_path: Path) -> None:
    path = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=20\n")
    no_slurm = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    absent = ("error: the Slurm executor needs Slurm's sbatch and srun, and this machine has no sbatch or srun: "
              "install Slurm's client tools")
    assert _cli_error(["run", "--config", str(path)], no_slurm).startswith(absent)
    folder = tmp_path / "results" / "started-elsewhere"  # `make continue EXECUTOR=slurm` of an unfinished folder
    (folder / "r").mkdir(parents=True)
    tiny_spec("r").write(folder / "r" / "spec.json")
    (folder / "matrix.json").write_text(json.dumps({"created": "2026-12-06T00:00:00", "command": "make",
                                                    "runs": ["r"]}))
    assert _cli_error(["continue", "--config", str(path), "--results", str(folder)], no_slurm).startswith(absent)
    assert sorted(p.name for p in folder.rglob("*")) == ["matrix.json", "r", "spec.json"]  # nothing started
    done = subprocess.run([sys.executable, "-m", "lib.cli", "dry-run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=no_slurm)
    assert done.returncode == 0 and not done.stderr, done.stderr  # the preview is made without Slurm ...
    assert "#SBATCH --time=240" in done.stdout and f"warning: {absent[7:]}" in done.stdout  # ... and says so
    down = _fake_slurm(tmp_path / "bin", "allocation failure: Unable to contact slurm controller (connect failure)")
    assert _cli_error(["run", "--config", str(path)], down) == (
        "error: the Slurm controller does not answer (allocation failure: Unable to contact slurm controller "
        "(connect failure)): start it (`sudo make slurm-up` for the one-node cluster on this machine; on a cluster, "
        "ask its admins: `scontrol ping` tells), or use `make EXECUTOR=local`")
    greedy = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=20\nCONFIG_SLURM_GPUS_PER_RUN=2\n")
    assert _cli_error(["run", "--config", str(greedy)], down).startswith("error: the Slurm controller does not "
                                                                          "answer (allocation failure: Unable")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["started-elsewhere"]  # refused first


def test_bad_executor_input_is_one_line(cluster, make_config, tmp_path: Path, capsys) -> None:
    path = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=20\n")
    nope = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=20\nCONFIG_SLURM_PARTITION=\"nope\"\n")
    assert _cli_error(["run", "--config", str(nope)]) == ("error: sbatch refused the job: sbatch: error: invalid "
                                                          "partition specified: nope")
    greedy = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=20\nCONFIG_SLURM_GPUS_PER_RUN=2\n")
    assert _cli_error(["run", "--config", str(greedy)]) == ("error: a run needs 2 GPUs, but a node of the default "
                                                            "partition has 0; lower CONFIG_SLURM_GPUS_PER_RUN or the "
                                                            "run's ranks, or choose a partition with bigger nodes")
    assert not (tmp_path / "results").exists()  # refused before any results folder was made
    short = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=20\nCONFIG_SLURM_TIME=\"5m\"\nCONFIG_CKPT_TIME=\"10m\"\n")
    assert cli.main(["dry-run", "--config", str(short)]) == 0
    assert "warning: CONFIG_SLURM_TIME (5 min) leaves 3 min before the warning signal" in capsys.readouterr().out
    assert _cli_error(["run", "--config", str(path), "--executor", "pbs"]) == (
        "error: unknown executor (CONFIG_EXECUTOR or EXECUTOR=) 'pbs'; valid: local, slurm (new ones are registered "
        "in lib/matrix/executors/__init__.py)")


def test_local_gpu_slots_give_each_run_its_own_devices() -> None:
    from lib.matrix.executors.local import GpuSlots

    slots = GpuSlots(["0", "1", "2", "3"])
    single, ddp = slots.take(1), slots.take(2)
    assert (single, ddp) == (["0"], ["1", "2"])
    assert slots.take(2) is None  # one left: a second DDP run waits
    slots.give(single)
    assert sorted(slots.take(2)) == ["0", "3"]
    assert GpuSlots(["0"]).take(8) == ["0"]  # a plan wanting more than exist gets them all and says why itself


def test_more_nodes_than_the_partition_has_is_one_line(cluster, make_config, tmp_path: Path) -> None:
    path = _config(make_config, tmp_path, "CONFIG_MAX_ITERS=12\nCONFIG_DIST_MULTINODE=y\nCONFIG_DIST_NNODES=3\n")
    line = _cli_error(["run", "--config", str(path)])
    assert re.fullmatch(r"error: a run spans 3 nodes \(CONFIG_DIST_NNODES\), but the default partition has 1; "
                        r"lower CONFIG_DIST_NNODES or choose a partition with more nodes", line), line
