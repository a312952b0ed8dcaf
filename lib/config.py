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

from lib.errors import ConfigError
from lib.hardware import HardwareSettings
from lib.kconf import (
    Reader,
    apply_overrides,
    check_user_values,
    open_kconfig,
    raise_on_load_warnings,
)
from lib.spec import OptimSettings, PruneSettings, TrainSettings
from lib.task import model_folder

SPARSITY_CHOICES = (50, 70, 90, 95, 99)


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
    model_options: Mapping[str, dict[str, Any]]
    hardware: HardwareSettings
    jobs: int
    tracker: str
    tracker_project: str
    wandb_mode: str
    results_dir: str
    results_name: str
    data_dir: str
    overrides: Mapping[str, str] = field(default_factory=dict)
    text: str = ""


def load(path: str | Path = ".config", overrides: Mapping[str, str] | None = None) -> Config:
    """Read, check and type the .config at ``path``; ``overrides`` maps symbol -> value."""
    return load_with_reads(path, overrides)[0]


def load_with_reads(path: str | Path, overrides: Mapping[str, str] | None = None) -> tuple[Config, set[str]]:
    """Like load(), also returning the names of every symbol the reader looked at."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: run `make defconfig-<name>` first (`make list-defconfigs` lists them)"
        )
    kconf = open_kconfig()
    kconf.load_config(str(path))
    raise_on_load_warnings(kconf, path)
    apply_overrides(kconf, overrides or {})
    reader = Reader(kconf)
    config = _build(reader, path, dict(overrides or {}))
    check_user_values(kconf)
    raise_on_load_warnings(kconf, path)  # values are computed lazily: range warnings come late
    return config, reader.read


def all_symbol_names() -> set[str]:
    """Every symbol defined in the Kconfig tree (for the dead-symbol test)."""
    kconf = open_kconfig()
    return {sym.name for sym in kconf.unique_defined_syms}


def parse_duration(text: str, symbol: str = "TIME_BUDGET") -> float:
    """'90s', '30m', '2h', '1.5h' or plain seconds -> seconds. '0' means no budget."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not match:
        raise ConfigError(f"CONFIG_{symbol}={text!r} is not a duration; use e.g. 90s, 30m, 2h or 0 for none")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


def _build(r: Reader, path: Path, overrides: dict[str, str]) -> Config:
    models = r.axis("MODEL")
    optimizers = r.axis("OPTIMIZER")
    prunings = r.axis("PRUNING")
    _require_nonempty(models=models, optimizers=optimizers, prunings=prunings)
    variants = r.axis("ADAMWPRUNE_VARIANT") if "state" in prunings else ()
    _check_state_pairing(optimizers, prunings)
    sparsities = _sparsities(r)
    train = _train(r)
    if any(p != "none" for p in prunings) and not sparsities:
        raise ConfigError("no target sparsity enabled: enable one of CONFIG_SPARSITY_ENABLE_* or turn off "
                          "CONFIG_SPARSITY_MULTIPLE")
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
        prune=_prune(r, prunings),
        train=train,
        model_options={m: _model_options(r, m) for m in models},
        hardware=_hardware(r),
        jobs=r.int("MATRIX_JOBS"),
        tracker=tracker,
        tracker_project=r.str("TRACKER_PROJECT") if tracker != "none" else "",
        wandb_mode=r.choice("WANDB_MODE") if tracker == "wandb" else "",
        results_dir=r.str("RESULTS_DIR") or "results",
        results_name=r.str("RESULTS_NAME"),
        data_dir=r.str("DATA_DIR") or "data",
        overrides=overrides,
        text=path.read_text(),
    )


def _check_state_pairing(optimizers: tuple[str, ...], prunings: tuple[str, ...]) -> None:
    """State pruning reads AdamWPrune's own moments; AdamWPrune prunes only from them."""
    if "state" in prunings and "adamwprune" not in optimizers:
        raise ConfigError("CONFIG_PRUNING_STATE needs the AdamWPrune optimizer (CONFIG_OPTIMIZER_ADAMWPRUNE): "
                          "it prunes from AdamWPrune's exp_avg/exp_avg_sq")
    if optimizers == ("adamwprune",) and not {"none", "state"} & set(prunings):
        raise ConfigError("CONFIG_OPTIMIZER_ADAMWPRUNE runs with pruning none or state only; "
                          "choose CONFIG_PRUNING_STATE (or another optimizer for magnitude/movement)")


def _require_nonempty(**axes: tuple[str, ...]) -> None:
    for axis, values in axes.items():
        if not values:
            symbol = axis[:-1].upper()
            raise ConfigError(f"no {axis[:-1]} enabled: enable one of CONFIG_{symbol}_ENABLE_* or turn off "
                              f"CONFIG_{symbol}_MULTIPLE")


def _sparsities(r: Reader) -> tuple[float, ...]:
    enabled = {pct: r.bool(f"SPARSITY_ENABLE_{pct}") for pct in SPARSITY_CHOICES}
    if r.bool("SPARSITY_MULTIPLE"):
        r.sym("TARGET_SPARSITY")
        return tuple(pct / 100 for pct, on in enabled.items() if on)
    return (r.float("TARGET_SPARSITY", 0.0, 1.0, open_low=True, open_high=True),)


def _optim(r: Reader, name: str) -> OptimSettings:
    prefix = name.upper()
    lr = r.float(f"{prefix}_LR", 0.0, open_low=True)
    decay = r.float(f"{prefix}_WEIGHT_DECAY", 0.0)
    if name == "sgd":
        return OptimSettings(name, lr, decay, momentum=r.float("SGD_MOMENTUM", 0.0, 1.0, open_high=True),
                             nesterov=r.bool("SGD_NESTEROV"))
    extra: dict[str, Any] = {}
    if name == "adamwprune":
        extra = {"base": r.choice("ADAMWPRUNE_BASE"), "amsgrad": r.bool("ADAMWPRUNE_AMSGRAD")}
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
            "spam_warmup": r.int("SPAM_WARMUP"), "spam_clip": r.bool("SPAM_CLIP")}


def _prune(r: Reader, prunings: tuple[str, ...]) -> PruneSettings:
    """Schedule and threshold, plus the options of each pruning method in the matrix."""
    options: dict[str, Any] = {}
    if "magnitude" in prunings:
        options["importance"] = r.choice("PRUNING_IMPORTANCE")
    if "movement" in prunings:
        options["movement_form"] = r.choice("MOVEMENT_FORM")
    if "state" in prunings:
        options["bitter8_form"] = r.choice("ADAMWPRUNE_BITTER8_FORM")
    threshold = r.choice("PRUNING_THRESHOLD")
    if threshold == "sampled":
        options["sample_fraction"] = r.float("PRUNING_SAMPLE_FRACTION", 0.0, 1.0, open_low=True)
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
    )
    # a manual micro-batch or grad-accum below 1 is refused by the plan (lib/hardware.py)
    if multinode:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}", settings.rdzv_endpoint):
            raise ConfigError(f"CONFIG_DIST_RDZV_ENDPOINT={settings.rdzv_endpoint!r}: give node 0's host:port, "
                              f"e.g. 10.0.0.1:29500")
        if settings.node_rank >= settings.nnodes:
            raise ConfigError(f"CONFIG_DIST_NODE_RANK={settings.node_rank} must be below CONFIG_DIST_NNODES="
                              f"{settings.nnodes}")
        if not settings.rdzv_id:
            raise ConfigError("CONFIG_DIST_RDZV_ID is empty; give the machines of one job a shared name")
    return settings


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
    )
    if not (settings.epochs or settings.max_iters or settings.time_budget_s):
        raise ConfigError("no training budget: CONFIG_EPOCHS, CONFIG_MAX_ITERS and CONFIG_TIME_BUDGET are all 0; "
                          "set one (e.g. `make EPOCHS=5`)")
    return settings


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
