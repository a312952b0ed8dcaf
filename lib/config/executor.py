"""ExecutorSettings: where the matrix runs (CONFIG_EXECUTOR_* and CONFIG_SLURM_*, lib/matrix/executors/Kconfig).

Not part of any RunSpec: a run trains the same wherever it executes, and `make continue` may finish a
folder with another executor than the one that started it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExecutorSettings:
    name: str = "local"  # "local" or "slurm"
    partition: str = ""  # empty: the cluster's default partition
    account: str = ""
    qos: str = ""
    time_min: int = 240  # each job's time limit, minutes
    gpus_per_run: int = 0  # 0: as many as the run's plan has ranks per node
    cpus_per_gpu: int = 8
    cpus_per_run: int = 2  # a CPU run's cores
    mem_gb: int = 0  # 0: the partition's default
    extra: tuple[str, ...] = field(default_factory=tuple)  # further sbatch options, "--key=value"
    array: bool = False  # one job array for the whole matrix instead of one job per run
    wait: bool = True  # wait for the jobs with a progress bar; off: submit and return
    signal_delay_s: int = 120  # the warning signal comes this long before the time limit
