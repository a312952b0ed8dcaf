"""The ONE reader of .config: kconfiglib -> a frozen, typed, validated Config.

Nothing else in the harness opens .config. Every problem is a ConfigError with
one line naming the symbol (CONFIG_X), what is wrong and how to fix it; this
includes what kconfiglib only warns about (an out-of-range int it silently
replaces with the default, an assignment to an unknown symbol, a setting that
has no effect because its dependencies are off).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kconfiglib

from lib.config import axes, distill
from lib.config import sweep as sweep_settings
from lib.config.axes import Axes
from lib.config.executor import ExecutorSettings
from lib.config.kconf import (
    Reader,
    apply_overrides,
    check_user_values,
    open_kconfig,
    raise_on_load_warnings,
    refuse_conflicting_lines,
)
from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings, SurgerySettings, SweepSettings, TrainSettings
from lib.core.structures import KINDS as STRUCTURE_KINDS
from lib.core.task import model_folder
from lib.hardware import HardwareSettings


@dataclass(frozen=True)
class Config:
    """A validated .config. The axes are tuples; `optim` and `model_options` cover the selected ones."""

    path: str
    models: tuple[str, ...]
    optimizers: tuple[str, ...]
    prunings: tuple[str, ...]
    variants: tuple[str, ...]
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    optim: Mapping[str, OptimSettings]
    prune: PruneSettings
    train: TrainSettings
    surgery: SurgerySettings
    sweep: SweepSettings
    model_options: Mapping[str, dict[str, Any]]
    hardware: HardwareSettings
    executor: ExecutorSettings
    jobs: int
    tracker: str
    tracker_project: str
    wandb_mode: str
    results_dir: str
    results_name: str
    data_dir: str
    overrides: Mapping[str, str] = field(default_factory=dict)
    text: str = ""
    axes: Axes = field(default_factory=Axes)  # the list axes and the search (lib/config/axes.py)


def load(path: str | Path = ".config", overrides: Mapping[str, str] | None = None) -> Config:
    """Read, check and type the .config at ``path``; ``overrides`` maps symbol -> value."""
    return load_with_reads(path, overrides)[0]


def load_with_reads(path: str | Path, overrides: Mapping[str, str] | None = None) -> tuple[Config, set[str]]:
    """Like load(), also returning the names of every symbol the reader looked at."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `make defconfig-<name>` first ({_MAKE_ONE})")
    text = _config_text(path)
    kconf = open_kconfig()
    refuse_conflicting_lines(kconf, text, path)
    kconf.load_config(str(path))
    raise_on_load_warnings(kconf, path)
    apply_overrides(kconf, overrides or {})
    check_user_values(kconf)
    reader = Reader(kconf)
    config = _build(reader, path, dict(overrides or {}), text)
    raise_on_load_warnings(kconf, path)  # values are computed lazily: range warnings come late
    return config, reader.read


_MAKE_ONE = "`make list-defconfigs` lists them"


def _config_text(path: Path) -> str:
    """The file's text; binary data, or a file without a single setting, is one clear line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise ConfigError(f"{path} is not a text .config (binary or non-UTF-8 data); write one with "
                          f"`make defconfig-<name>` ({_MAKE_ONE})")
    settings = [line for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#") or re.match(r"# CONFIG_\w+ is not set", line)]
    if not settings:
        raise ConfigError(f"{path} is empty (no CONFIG_ lines), so it would train only the defaults; write one "
                          f"with `make defconfig-<name>` ({_MAKE_ONE}) or `make menuconfig`")
    return text


def all_symbol_names() -> set[str]:
    """Every symbol defined in the Kconfig tree (for the dead-symbol test)."""
    kconf = open_kconfig()
    return {sym.name for sym in kconf.unique_defined_syms}


_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"(?:({_NUMBER})\s*h)?\s*(?:({_NUMBER})\s*m)?\s*(?:({_NUMBER})\s*s)?")


def parse_duration(text: str, symbol: str = "TIME_BUDGET") -> float:
    """'45s', '90m', '2h', '1.5h', '1h 30m' or '1h30m' -> seconds; '0' means no budget.

    A bare number other than 0 is refused: 5 could mean seconds, minutes or hours.
    """
    value = text.strip()
    if re.fullmatch(r"\d+(?:\.\d*)?", value):
        if float(value) == 0:
            return 0.0
        n = f"{float(value):g}"
        raise ConfigError(f"CONFIG_{symbol}={text!r} has no unit: write {n}s, {n}m or {n}h (or 0 for no budget)")
    match = _DURATION.fullmatch(value)
    if not match or not any(match.groups()):
        raise ConfigError(f"CONFIG_{symbol}={text!r} is not a duration; use e.g. 45s, 90m, 2h, 1h 30m "
                          f"or 0 for none")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _build(r: Reader, path: Path, overrides: dict[str, str], text: str) -> Config:
    """The typed Config. The axes need no checks here: the Kconfig dependencies keep every axis
    non-empty, state pruning with AdamWPrune and AdamWPrune alone with none/state pruning."""
    models = r.axis("MODEL")
    optimizers = r.axis("OPTIMIZER")
    prunings = r.axis("PRUNING")
    variants = r.axis("ADAMWPRUNE_VARIANT") if "state" in prunings else ()
    lists = axes.read(r, optimizers, prunings)
    sparsities = axes.sparsity_axis(r, lists)
    train = _train(r)
    first_seed = r.int("SEED")
    tracker = r.choice("TRACKER")
    return Config(
        path=str(path),
        models=models,
        optimizers=optimizers,
        prunings=prunings,
        variants=variants,
        sparsities=sparsities,
        seeds=tuple(range(first_seed, first_seed + r.int("SEEDS"))),
        optim={name: _optim(r, name) for name in optimizers},
        prune=_prune(r, prunings, lists, axes.distribution(r, models, sparsities)),
        train=train,
        surgery=_surgery(r),
        sweep=_sweep(r),
        model_options={m: _model_options(r, m) for m in models},
        hardware=_hardware(r),
        executor=_executor(r),
        jobs=r.int("MATRIX_JOBS"),
        tracker=tracker,
        tracker_project=r.str("TRACKER_PROJECT") if tracker != "none" else "",
        wandb_mode=r.choice("WANDB_MODE") if tracker == "wandb" else "",
        results_dir=r.str("RESULTS_DIR") or "results",
        results_name=r.str("RESULTS_NAME"),
        data_dir=r.str("DATA_DIR") or "data",
        overrides=overrides,
        text=text,
        axes=lists,
    )


def _optim(r: Reader, name: str) -> OptimSettings:
    prefix = name.upper()
    lr = r.float(f"{prefix}_LR", 0.0, open_low=True)
    decay = r.float(f"{prefix}_WEIGHT_DECAY", 0.0)
    compact = r.bool("COMPACT_STATE")  # Kconfig allows it only where a compact step exists (lib/optim/Kconfig)
    if name == "sgd":
        return OptimSettings(name, lr, decay, momentum=r.float("SGD_MOMENTUM", 0.0, 1.0, open_high=True),
                             nesterov=r.bool("SGD_NESTEROV"))
    extra: dict[str, Any] = {"compact_state": compact}
    if name == "adamwprune":
        extra.update(base=r.choice("ADAMWPRUNE_BASE"), amsgrad=r.bool("ADAMWPRUNE_AMSGRAD"))
    if name == "adamwspam" or extra.get("base") == "adamwspam":
        extra.update(_spam(r))
    return OptimSettings(
        name, lr, decay,
        beta1=r.float(f"{prefix}_BETA1", 0.0, 1.0, open_high=True),
        beta2=r.float(f"{prefix}_BETA2", 0.0, 1.0, open_high=True),
        eps=r.float(f"{prefix}_EPS", 0.0, open_low=True),
        **extra,
    )


def _spam(r: Reader) -> dict[str, Any]:
    theta = r.float("SPAM_THETA")
    if not theta > 0:
        raise ConfigError(f"CONFIG_SPAM_THETA={r.str('SPAM_THETA')} must be > 0 (spikes are g^2 > theta * v)")
    return {"spam_form": r.choice("SPAM_FORM"), "spam_theta": theta, "spam_interval": r.int("SPAM_INTERVAL"),
            "spam_warmup": r.int("SPAM_WARMUP"), "spam_clip": r.bool("SPAM_CLIP"),
            "spam_accu": r.int("SPAM_ACCU") if r.choice("SPAM_FORM") == "released" else 20}


def _prune(r: Reader, prunings: tuple[str, ...], lists: Axes, distribution: dict[str, Any]) -> PruneSettings:
    """Schedule and threshold, plus the options of each pruning method in the matrix."""
    options: dict[str, Any] = dict(distribution)
    if {"magnitude", "structured", "layer-dropout", "nm"} & set(prunings):  # the metric they rank by
        options["importance"] = r.choice("PRUNING_IMPORTANCE")
    if "nm" in prunings:  # Kconfig offers the method only while N < M
        options["nm_n"], options["nm_m"] = r.int("PRUNING_NM_N"), int(r.choice("PRUNING_NM_M"))
    if "movement" in prunings:
        options["movement_form"] = r.choice("MOVEMENT_FORM")
    if "state" in prunings:
        options["bitter8_form"] = r.choice("ADAMWPRUNE_BITTER8_FORM")
    threshold = r.choice("PRUNING_THRESHOLD")
    if threshold == "sampled" or "sampled" in lists.thresholds:
        options["sample_tolerance"] = r.float("PRUNING_SAMPLE_TOLERANCE", 0.0, 10.0, open_low=True)
    start = _step_or_fraction(r, "PRUNING_START")
    end = _step_or_fraction(r, "PRUNING_END")
    if type(start) is type(end) and end <= start:
        raise ConfigError(f"CONFIG_PRUNING_END={end} comes before CONFIG_PRUNING_START={start}; "
                          f"the schedule must end after it starts")
    return PruneSettings(
        schedule=r.choice("PRUNING_SCHEDULE"),
        start=start,
        end=end,
        frequency=r.int("PRUNING_FREQUENCY"),
        threshold=threshold,
        **options,
    )


def _step_or_fraction(r: Reader, name: str) -> int | float:
    text = r.str(name).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"\d*\.\d*", text) and text != "." and 0.0 <= float(text) <= 1.0:
        return float(text)
    raise ConfigError(f"CONFIG_{name}={text!r}: give a step (e.g. 1000) or a fraction of the run "
                      f"with a decimal point (e.g. 0.25)")


def _hardware(r: Reader) -> HardwareSettings:
    manual = r.choice("BATCH_PLAN") == "manual"
    multinode = r.bool("DIST_MULTINODE")
    settings = HardwareSettings(
        device=r.choice("DEVICE"),
        compile=r.choice("COMPILE"),
        fused_step=r.choice("FUSED_STEP"),
        act_ckpt=r.choice("ACTIVATION_CKPT"),
        act_ckpt_every=r.int("ACTIVATION_CKPT_EVERY") if r.choice("ACTIVATION_CKPT") == "uniform" else 2,
        act_budget_mb=r.int("ACTIVATION_BUDGET_MB") if r.choice("ACTIVATION_CKPT") == "budget" else 0,
        dtype=r.choice("DTYPE"),
        cpu_threads=r.int("CPU_THREADS"),
        batch_plan="manual" if manual else "auto",
        micro_batch=r.int("MICRO_BATCH") if manual else 0,
        grad_accum=r.int("GRAD_ACCUM") if manual else 0,
        probe=r.bool("PROBE_BATCH"),
        memory_margin=r.int("GPU_MEMORY_MARGIN") / 100,
        ranks_per_node=r.int("RANKS_PER_NODE"),
        tf32=r.bool("TF32"),
        nnodes=r.int("DIST_NNODES") if multinode else 1,
        node_rank=r.int("DIST_NODE_RANK") if multinode else 0,
        rdzv_endpoint=r.str("DIST_RDZV_ENDPOINT").strip() if multinode else "",
        rdzv_id=r.str("DIST_RDZV_ID").strip() if multinode else "",
        parallel=r.choice("PARALLEL"),
    )
    # a manual micro-batch or grad-accum below 1, or a product that misses the batch, is refused by the
    # plan (lib/hardware/__init__.py): the number of ranks it multiplies with depends on the machine
    if multinode:
        _check_multinode(settings)
    return settings


def _executor(r: Reader) -> ExecutorSettings:
    """CONFIG_EXECUTOR and the Slurm settings (read whatever the choice: `make EXECUTOR=` switches)."""
    return ExecutorSettings(
        name=r.choice("EXECUTOR"), partition=r.str("SLURM_PARTITION").strip(), account=r.str("SLURM_ACCOUNT").strip(),
        qos=r.str("SLURM_QOS").strip(), time_min=max(1, round(parse_duration(r.str("SLURM_TIME"), "SLURM_TIME") / 60)),
        gpus_per_run=r.int("SLURM_GPUS_PER_RUN"), cpus_per_gpu=r.int("SLURM_CPUS_PER_GPU"),
        cpus_per_run=r.int("SLURM_CPUS_PER_RUN"), mem_gb=r.int("SLURM_MEM_GB"), extra=_sbatch_extra(r),
        array=r.bool("SLURM_ARRAY"), wait=r.bool("SLURM_WAIT"), signal_delay_s=r.int("SLURM_SIGNAL_DELAY"))


def _sbatch_extra(r: Reader) -> tuple[str, ...]:
    options = tuple(r.str("SLURM_EXTRA").split())
    for option in options:
        if not re.fullmatch(r"--[a-z][a-z0-9-]*(=\S+)?", option):
            raise ConfigError(f"CONFIG_SLURM_EXTRA: {option!r} is not an sbatch option like --constraint=h100")
    return options


def _check_multinode(s: HardwareSettings) -> None:
    """What Kconfig cannot express: the endpoint's host:port form, rank < machines, a non-empty id."""
    if not re.fullmatch(r"[^\s:]+:\d{1,5}", s.rdzv_endpoint):
        raise ConfigError(f"CONFIG_DIST_RDZV_ENDPOINT={s.rdzv_endpoint!r}: give node 0's host:port, "
                          f"e.g. 10.0.0.1:29500")
    host = s.rdzv_endpoint.rsplit(":", 1)[0]
    if s.node_rank > 0 and (host == "localhost" or host.startswith("127.")):
        raise ConfigError(f"CONFIG_DIST_RDZV_ENDPOINT={s.rdzv_endpoint!r} on node {s.node_rank}: this machine "
                          f"must reach node 0; give node 0's address, e.g. 10.0.0.1:29500")
    if s.node_rank >= s.nnodes:
        raise ConfigError(f"CONFIG_DIST_NODE_RANK={s.node_rank} must be below CONFIG_DIST_NNODES={s.nnodes}")
    if not s.rdzv_id:
        raise ConfigError("CONFIG_DIST_RDZV_ID is empty; give the machines of one job a shared name")


def _train(r: Reader) -> TrainSettings:
    settings = TrainSettings(
        batch_size=r.int("BATCH_SIZE"),
        epochs=r.int("EPOCHS"),
        max_iters=r.int("MAX_ITERS"),
        time_budget_s=parse_duration(r.str("TIME_BUDGET")),
        min_lr_ratio=r.float("MIN_LR_RATIO", 0.0, 1.0),
        warmup_steps=r.int("WARMUP_STEPS"),
        grad_clip=r.float("GRAD_CLIP", 0.0),
        eval_interval=r.int("EVAL_INTERVAL"),
        eval_batches=r.int("EVAL_BATCHES"),
        log_interval=r.int("LOG_INTERVAL"),
        deterministic=r.bool("DETERMINISTIC"),
        keep_checkpoints=r.bool("KEEP_CHECKPOINTS"),
        ckpt_interval=r.int("CKPT_INTERVAL"),
        ckpt_time_s=parse_duration(r.str("CKPT_TIME"), "CKPT_TIME"),
        ckpt_keep_last=r.int("CKPT_KEEP_LAST"),
        ckpt_milestone=r.int("CKPT_MILESTONE"),
        structure_stats_every=r.int("STRUCTURE_STATS_EVERY"),
        surgery_every=r.int("SURGERY_EVERY") if r.int("STRUCTURE_STATS_EVERY") else 0,  # it cuts by them
        quant_aware=r.bool("QUANT_AWARE"),
        **distill.read(r),
    )
    if not (settings.epochs or settings.max_iters or settings.time_budget_s):  # Kconfig misses "0s", "0m"
        raise ConfigError("no training budget: CONFIG_EPOCHS, CONFIG_MAX_ITERS and CONFIG_TIME_BUDGET are all 0; "
                          "set one (e.g. `make EPOCHS=5`)")
    return settings


SURGERY_KINDS = ("all", *STRUCTURE_KINDS, "blocks")


def _surgery(r: Reader) -> SurgerySettings:
    return SurgerySettings(fraction=r.float("SURGERY_FRACTION", 0.0, 1.0, open_low=True, open_high=True),
                           structure=surgery_structure(r.str("SURGERY_STRUCTURE")),
                           max_loss_increase=r.float("SURGERY_MAX_LOSS_INCREASE", 0.0))


def _sweep(r: Reader) -> SweepSettings:
    """CONFIG_SWEEP_*: what `make sweep` tries (parsed by lib/config/sweep.py, as the command line is)."""
    s = sweep_settings
    return SweepSettings(sparsities=s.sparsities(r.str("SWEEP_SPARSITIES"), "CONFIG_SWEEP_SPARSITIES"),
                         metrics=s.metrics(r.str("SWEEP_METRICS"), "CONFIG_SWEEP_METRICS"),
                         patterns=s.patterns(r.str("SWEEP_PATTERNS"), "CONFIG_SWEEP_PATTERNS"),
                         calibration_batches=r.int("SWEEP_CALIBRATION_BATCHES"),
                         tolerance_accuracy=s.tolerance(r.str("SWEEP_TOLERANCE_ACCURACY"),
                                                        "CONFIG_SWEEP_TOLERANCE_ACCURACY"),
                         tolerance_perplexity=s.tolerance(r.str("SWEEP_TOLERANCE_PERPLEXITY"),
                                                          "CONFIG_SWEEP_TOLERANCE_PERPLEXITY"),
                         int8=r.bool("SWEEP_INT8"), layers=r.bool("SWEEP_LAYERS"))


def surgery_structure(text: str) -> str:
    """A structure kind for surgery (CONFIG_SURGERY_STRUCTURE or STRUCTURE=); one line if unknown."""
    if text not in SURGERY_KINDS:
        raise ConfigError(f"surgery structure {text!r} is not one of {', '.join(SURGERY_KINDS)} "
                          f"(CONFIG_SURGERY_STRUCTURE or STRUCTURE=)")
    return text


def _model_options(r: Reader, model: str) -> dict[str, Any]:
    """Every symbol defined in <folder>/Kconfig, keyed by name minus the folder prefix, lowercased."""
    folder = model_folder(model)
    prefix = folder.upper() + "_"
    options: dict[str, Any] = {}
    own_file = f"{folder}/Kconfig"
    for choice in r.kconf.unique_choices:
        if choice.name and choice.name.startswith(prefix) and choice.nodes[0].filename == own_file:
            options[choice.name[len(prefix):].lower()] = r.choice(choice.name)
    for sym in r.kconf.unique_defined_syms:
        if sym.choice or sym.nodes[0].filename != own_file:
            continue
        key = sym.name[len(prefix):].lower()
        if sym.orig_type == kconfiglib.BOOL:
            options[key] = r.bool(sym.name)
        elif sym.orig_type in (kconfiglib.INT, kconfiglib.HEX):
            options[key] = r.int(sym.name)
        else:
            options[key] = r.str(sym.name)
    return options
