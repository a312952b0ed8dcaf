"""The Slurm executor: one job per run (or one job array) through submitit (docs/slurm.md).

Each job runs ``lib.matrix.executors.job.RunJob`` in its run folder: the same lib.train.run as the local executor, so
the folders, logs and records are the same. submitit's warning signal is SIGUSR1 (SUBMITIT_PREEMPT_SIGNAL),
the signal lib.train.run already answers with a checkpoint and a clean stop; submitit then requeues the job.
Each run folder gets slurm.json (its job id and the sbatch parameters) and slurm/ (submitit's files).

Job states come from ``squeue --states=all`` (finished jobs stay there for the cluster's MinJobAge) and
from the runs' own summary.json, never from sacct: a cluster without an accounting database has none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lib.config.executor import ExecutorSettings
from lib.core import ROOT
from lib.core.errors import HarnessError, first_line
from lib.core.files import write_json_atomic
from lib.core.spec import RunSpec
from lib.matrix.records import one_line, read_summary
from lib.results import read_json, run_record

os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # before submitit reads it; jobs inherit it
POLL_S = 2.0
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
NO_SBATCH = ("the Slurm executor needs Slurm's sbatch and srun, and this machine has no {missing}: install Slurm's "
             "client tools for your cluster, start a one-node cluster here with `sudo make slurm-up`, or use "
             "`make EXECUTOR=local`")
UNREACHABLE = ("the Slurm controller does not answer ({said}): start it (`sudo make slurm-up` for the one-node "
               "cluster on this machine; on a cluster, ask its admins: `scontrol ping` tells), or use "
               "`make EXECUTOR=local`")
_DOWN = re.compile(r"unable to contact slurm controller|connection refused|connect failure|socket timed out|"
                   r"slurm_load_\w+ error|could not establish|zero bytes were transmitted", re.IGNORECASE)


def require_slurm() -> None:
    """One line when this machine lacks the Slurm commands submitit calls (before submitit's own traceback)."""
    missing = [tool for tool in ("sbatch", "srun") if not shutil.which(tool)]
    if missing:
        raise HarnessError(NO_SBATCH.format(missing=" or ".join(missing)))


def slurm_error(what: str, text: str) -> HarnessError:
    """The error for a Slurm command that failed with ``text``: the controller being down is named as such."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    down = next((line for line in lines if _DOWN.search(line)), None)
    if down:
        return HarnessError(UNREACHABLE.format(said=down))
    said = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no message")
    return HarnessError(f"{what}: {said}")


class SlurmExecutor:
    name = "slurm"

    def __init__(self, settings: ExecutorSettings, node_gpus: int | None = None):
        self.settings = settings
        self.node_gpus = node_gpus  # GPUs of one node (made up by GPUS=, or read from sinfo when needed)
        self.checked = False  # `make` checks before the results folder exists; run() then need not again

    # -- before anything is submitted -------------------------------------------------------------

    def check(self, specs: list[RunSpec], say: Any = print) -> None:
        """One line for what cannot work (no sbatch, more GPUs per run than a node has); a warning for a
        time limit shorter than a checkpoint interval."""
        require_slurm()
        self.check_gpus(specs)
        if specs:  # the scheduler's own verdict on partition, account, QOS, time and GPUs, before any folder exists
            self._test_only(specs[0])
        self.warn_time(specs, say)
        self.checked = True

    def warn_time(self, specs: list[RunSpec], say: Any = print) -> None:
        """A time limit shorter than the checkpoint interval: a job reaching it checkpoints only on the signal."""
        limit = self.settings.time_min * 60 - self.settings.signal_delay_s
        every = max((spec.train.ckpt_time_s for spec in specs), default=0)
        if every and every > limit:
            say(f"warning: CONFIG_SLURM_TIME ({self.settings.time_min} min) leaves {limit / 60:.0f} min before the "
                f"warning signal, less than one checkpoint interval (CONFIG_CKPT_TIME, {every / 60:.0f} min): each "
                f"job checkpoints only when the signal comes; lengthen the limit or shorten the interval")

    def _test_only(self, spec: RunSpec) -> None:
        params = self.parameters(spec)
        args = ["sbatch", "--test-only", f"--time={params['time']}", f"--cpus-per-task={params['cpus_per_task']}",
                f"--nodes={params['nodes']}", f"--ntasks-per-node={params['ntasks_per_node']}"]
        args += [f"--{key}={params[key]}" for key in ("partition", "account", "qos", "mem") if key in params]
        if "gpus_per_node" in params:
            args.append(f"--gpus-per-node={params['gpus_per_node']}")
        args += [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
                 for k, v in params["additional_parameters"].items()]
        done = subprocess.run([*args, "--wrap=true"], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise slurm_error("sbatch refused the job", done.stderr or done.stdout)

    def check_gpus(self, specs: list[RunSpec]) -> None:
        """One line when a run needs more GPUs than a node has, or more nodes than the partition."""
        nodes = max((spec.hardware.nnodes for spec in specs), default=1)
        if nodes > 1 and self.node_gpus is None:  # a made-up node (GPUS=) previews any number of them
            have = partition_nodes(self.settings.partition)
            if nodes > have:
                where = f"partition {self.settings.partition!r}" if self.settings.partition else "the default partition"
                raise HarnessError(f"a run spans {nodes} nodes (CONFIG_DIST_NNODES), but {where} has {have}; lower "
                                   f"CONFIG_DIST_NNODES or choose a partition with more nodes")
        wanted = max((self.gpus(spec) for spec in specs), default=0)
        node = self.node_gpus if self.node_gpus is not None else (partition_gpus(self.settings.partition)
                                                                  if wanted else 0)
        if wanted > node:
            where = f"partition {self.settings.partition!r}" if self.settings.partition else "the default partition"
            raise HarnessError(f"a run needs {wanted} GPUs, but a node of {where} has {node}; lower "
                               f"CONFIG_SLURM_GPUS_PER_RUN or the run's ranks, or choose a partition with bigger nodes")

    def gpus(self, spec: RunSpec) -> int:
        if self.settings.gpus_per_run:
            return self.settings.gpus_per_run
        return spec.hardware.nproc_per_node if spec.hardware.device.startswith("cuda") else 0

    def parameters(self, spec: RunSpec) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters for ``spec``'s job."""
        s, gpus, hw = self.settings, self.gpus(spec), spec.hardware
        tasks = hw.nproc_per_node if hw.world_size > 1 else 1  # one task per rank (lib/matrix/executors/job.py)
        cpus = gpus * s.cpus_per_gpu if gpus else s.cpus_per_run
        params: dict[str, Any] = {
            "job_name": spec.name, "time": s.time_min, "signal_delay_s": s.signal_delay_s, "nodes": hw.nnodes,
            "ntasks_per_node": tasks, "cpus_per_task": max(1, cpus // tasks),
            "setup": [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", "export SUBMITIT_PREEMPT_SIGNAL=USR1"],
            "additional_parameters": dict(_extra(option) for option in s.extra)}
        if gpus:
            params["gpus_per_node"] = gpus
        for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
            if value:
                params[key] = value
        if s.mem_gb:
            params["mem"] = f"{s.mem_gb}GB"
        return params

    def sbatch_lines(self, spec: RunSpec, folder: Path) -> list[str]:
        """The #SBATCH lines of ``spec``'s job (`make dry-run`): submitit's own text, made without its executor,
        which refuses to exist where srun is missing (a preview for a cluster elsewhere needs none)."""
        from submitit.slurm.slurm import _make_sbatch_string

        text = _make_sbatch_string(command="python -m submitit.core._submit", folder=folder, **self.parameters(spec))
        return [line for line in text.splitlines() if line.startswith(("#SBATCH", "srun"))]

    # -- submitting and waiting --------------------------------------------------------------------

    def run(self, folder: Path, names: list[str], jobs: int, record: bool = True) -> bool:
        specs = [RunSpec.read(folder / name / "spec.json") for name in names]
        if not self.checked:  # `make continue`: the folder exists already
            self.check(specs)
        ids = self._submit(folder, names, specs)
        print(f"submitted {len(ids)} Slurm job(s): {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}", flush=True)
        if not self.settings.wait:
            print(f"not waiting (CONFIG_SLURM_WAIT off): `make status RESULTS={folder}` shows them, "
                  f"`make report RESULTS={folder}` gathers what finished", flush=True)
            return False
        self.wait(folder, names)
        return True

    def _submit(self, folder: Path, names: list[str], specs: list[RunSpec]) -> list[str]:
        from lib.matrix.executors.job import RunJob

        try:
            if self.settings.array:  # one array per set of runs that ask for the same resources
                groups: dict[str, list[str]] = {}
                for name, spec in zip(names, specs, strict=True):
                    key = json.dumps({**self.parameters(spec), "job_name": folder.name}, sort_keys=True)
                    groups.setdefault(key, []).append(name)
                by_name = {}
                for key, members in groups.items():
                    executor = _submitit_executor(folder / "slurm", json.loads(key))
                    with executor.batch():
                        by_name.update({name: executor.submit(RunJob(str(folder / name))) for name in members})
                jobs = [by_name[name] for name in names]
            else:
                jobs = [_submitit_executor(folder / name / "slurm", self.parameters(spec)).submit(
                    RunJob(str(folder / name))) for name, spec in zip(names, specs, strict=True)]
        except (subprocess.CalledProcessError, OSError) as exc:
            raise slurm_error("sbatch refused the job", _said(exc)) from None
        except Exception as exc:  # submitit wraps sbatch's failure in its own error types
            if "sbatch" not in str(exc) and "Slurm" not in str(exc):
                raise
            raise slurm_error("sbatch refused the job", _said(exc)) from None
        for name, spec, job in zip(names, specs, jobs, strict=True):
            write_json_atomic(folder / name / "slurm.json", {"job_id": str(job.job_id), "submitted": time.time(),
                                                              "parameters": self.parameters(spec)})
        return [str(job.job_id) for job in jobs]

    def wait(self, folder: Path, names: list[str]) -> None:
        """Until every run's job has ended: a progress bar, and each run's line as it ends."""
        left = set(names)
        unknown: dict[str, int] = {}  # polls in a row that squeue did not know a job without a record
        bar = tqdm(total=len(names), unit="run", disable=None, leave=False)
        try:
            while left:
                states = job_states([job_id(folder / n) for n in left])
                for name in sorted(left):
                    state = states.get(job_id(folder / name) or "", "")
                    unknown[name] = 0 if state else unknown.get(name, 0) + 1
                    if state in ENDED or (not state and (_has_record(folder / name) or unknown[name] > 5)):
                        left.discard(name)
                        bar.update(1)
                        tqdm.write(one_line(read_summary(folder / name, exit_code=None if _has_record(
                            folder / name) else -1)))
                if left:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            raise HarnessError(f"stopped waiting; the jobs go on (`make status RESULTS={folder}`)") from None
        finally:
            bar.close()


def _submitit_executor(folder: Path, params: dict[str, Any]) -> Any:
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder))
    executor.update_parameters(**params)
    return executor


def _extra(option: str) -> tuple[str, Any]:
    key, _, value = option[2:].partition("=")
    return key.replace("-", "_"), value or True


def _said(exc: BaseException) -> str:
    """What a failed Slurm command printed (its output, else the exception's first line)."""
    text = getattr(exc, "output", None) or getattr(exc, "stderr", None) or first_line(exc)
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def _has_record(run_dir: Path) -> bool:
    return run_record(run_dir).record is not None


def live_jobs(folder: Path, names: list[str]) -> dict[str, str]:
    """{run: "job <id> <STATE>"} for runs whose Slurm job is still queued, running or requeued."""
    ids = {name: job_id(folder / name) for name in names}
    states = job_states(list(ids.values()))
    return {name: f"job {ids[name]} {states[ids[name]]}" for name in names
            if ids[name] in states and states[ids[name]] not in ENDED}


def job_id(run_dir: Path) -> str | None:
    data, _ = read_json(run_dir / "slurm.json")
    return str(data["job_id"]) if isinstance(data, dict) and "job_id" in data else None


def job_states(ids: list[str | None]) -> dict[str, str]:
    """{job id: Slurm state} from squeue (array elements as "<array>_<index>"); {} when squeue fails."""
    wanted = sorted({i for i in ids if i})
    if not wanted or not shutil.which("squeue"):
        return {}
    done = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i %T", "-j", ",".join(wanted)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode and _DOWN.search(done.stderr):  # not knowing live jobs could start a run twice
        raise slurm_error("squeue failed", done.stderr)
    states = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def partition_nodes(partition: str) -> int:
    """The nodes of ``partition`` (or the default one), from sinfo."""
    args = ["sinfo", "-h", "-o", "%D"] + (["-p", partition] if partition else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise slurm_error("sinfo failed", done.stderr or done.stdout)
    return sum(int(n) for n in re.findall(r"\d+", done.stdout))


def partition_gpus(partition: str) -> int:
    """The most GPUs one node of ``partition`` (or the default one) has, from sinfo's gres."""
    args = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise slurm_error("sinfo failed", done.stderr or done.stdout)
    counts = [int(m) for m in re.findall(r"gpu(?::[^:,(\s]+)?:(\d+)", done.stdout)]
    return max(counts, default=0)
