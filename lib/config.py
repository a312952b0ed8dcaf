"""The ONE reader of .config: kconfiglib -> a frozen, typed, validated Config.

Nothing else in the harness opens .config. Every problem is a ConfigError with
one line naming the symbol (CONFIG_X), what is wrong and how to fix it; this
includes what kconfiglib only warns about (an out-of-range int it silently
replaces with the default, an assignment to an unknown symbol, a setting that
has no effect because its dependencies are off).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kconfiglib

from lib.errors import ConfigError
from lib.spec import OptimSettings, PruneSettings, TrainSettings

ROOT = Path(__file__).resolve().parent.parent
KCONFIG = ROOT / "Kconfig"
SPARSITY_CHOICES = (50, 70, 90, 95, 99)


@dataclass(frozen=True)
class Config:
    """A validated .config. The axes are tuples; `optim` and `model_options` cover the selected ones."""

    path: str
    models: tuple[str, ...]
    optimizers: tuple[str, ...]
    prunings: tuple[str, ...]
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    optim: Mapping[str, OptimSettings]
    prune: PruneSettings
    train: TrainSettings
    model_options: Mapping[str, dict[str, Any]]
    device: str
    cpu_threads: int
    jobs: int
    tracker: str
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
    kconf = _open_kconfig()
    kconf.load_config(str(path))
    _raise_on_load_warnings(kconf, path)
    _apply_overrides(kconf, overrides or {})
    reader = _Reader(kconf)
    config = _build(reader, path, dict(overrides or {}))
    _check_user_values(kconf)
    _raise_on_load_warnings(kconf, path)  # values are computed lazily: range warnings come late
    return config, reader.read


def all_symbol_names() -> set[str]:
    """Every symbol defined in the Kconfig tree (for the dead-symbol test)."""
    kconf = _open_kconfig()
    return {sym.name for sym in kconf.unique_defined_syms}


def parse_duration(text: str, symbol: str = "TIME_BUDGET") -> float:
    """'90s', '30m', '2h', '1.5h' or plain seconds -> seconds. '0' means no budget."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not match:
        raise ConfigError(f"CONFIG_{symbol}={text!r} is not a duration; use e.g. 90s, 30m, 2h or 0 for none")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


def _open_kconfig() -> kconfiglib.Kconfig:
    os.environ["srctree"] = str(ROOT)  # `source` paths are relative to the project root
    try:
        kconf = kconfiglib.Kconfig(str(KCONFIG), warn_to_stderr=False, suppress_traceback=False)
    except kconfiglib.KconfigError as exc:
        raise ConfigError(f"the Kconfig tree does not parse: {str(exc).splitlines()[0]}") from None
    kconf.warnings.clear()
    return kconf


_FATAL_WARNINGS = ("is not a valid value", "is invalid for", "malformed", "outside the active range")


def _raise_on_load_warnings(kconf: kconfiglib.Kconfig, path: Path) -> None:
    for name, value in kconf.missing_syms:
        raise ConfigError(f"{path}: CONFIG_{name}={value} is not a symbol of this Kconfig tree (a typo, or "
                          f"renamed?); remove it or run `make olddefconfig`")
    for warning in kconf.warnings:
        if any(key in warning for key in _FATAL_WARNINGS):
            text = warning.split("warning: ", 1)[-1]
            raise ConfigError(f"{path}: {text}; fix it with `make menuconfig` or a defconfig target")


def _apply_overrides(kconf: kconfiglib.Kconfig, overrides: Mapping[str, str]) -> None:
    for name, value in overrides.items():
        sym = kconf.syms.get(name)
        if sym is None or not sym.nodes:
            raise ConfigError(f"override {name}={value}: no such symbol in the Kconfig tree")
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and not re.fullmatch(r"-?\d+", value):
            raise ConfigError(f"override {name}={value!r}: CONFIG_{name} takes a whole number")
        sym.set_value(value)


def _check_user_values(kconf: kconfiglib.Kconfig) -> None:
    """Refuse settings that kconfiglib would silently ignore or replace."""
    for sym in kconf.unique_defined_syms:
        asked = sym.user_value
        if asked is None:
            continue
        if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
            if asked and not sym.tri_value and not sym.choice:
                deps = kconfiglib.expr_str(sym.direct_dep)
                raise ConfigError(
                    f"CONFIG_{sym.name}=y has no effect: it depends on {deps}; set that too or drop the line"
                )
            continue
        if sym.visibility == 0:
            deps = kconfiglib.expr_str(sym.direct_dep)
            raise ConfigError(f"CONFIG_{sym.name} has no effect: it depends on {deps}; set that too or drop it")
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and int(asked, 0) != int(sym.str_value, 0):
            low, high = _int_range(sym)
            raise ConfigError(
                f"CONFIG_{sym.name}={asked} is outside its range [{low}, {high}]; "
                f"pick a value in range (make menuconfig)"
            )


def _int_range(sym: kconfiglib.Symbol) -> tuple[str, str]:
    for low, high, cond in sym.ranges:
        if kconfiglib.expr_value(cond):
            return low.str_value, high.str_value
    return "?", "?"


class _Reader:
    """Typed access to symbols; remembers which names were read (see the dead-symbol test)."""

    def __init__(self, kconf: kconfiglib.Kconfig) -> None:
        self.kconf = kconf
        self.read: set[str] = set()

    def sym(self, name: str) -> kconfiglib.Symbol:
        self.read.add(name)
        return self.kconf.syms[name]

    def bool(self, name: str) -> bool:
        return self.sym(name).tri_value == 2

    def int(self, name: str) -> int:
        return int(self.sym(name).str_value, 0)

    def str(self, name: str) -> str:
        return self.sym(name).str_value

    def float(self, name: str, low: float | None = None, high: float | None = None,
              open_low: bool = False, open_high: bool = False) -> float:
        text = self.str(name)
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"CONFIG_{name}={text!r} is not a number; give e.g. 0.5 or 3e-3") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if value != value or too_low or too_high:
            lo, hi = ("(" if open_low else "[") + str(low), str(high) + (")" if open_high else "]")
            raise ConfigError(f"CONFIG_{name}={text} is outside {lo}, {hi}; pick a value in range")
        return value

    def choice(self, name: str) -> str:
        """The selected member of named choice ``name``, lowercased, without the prefix."""
        choice = self.kconf.named_choices[name]
        for member in choice.syms:
            self.read.add(member.name)
        if choice.selection is None:
            return ""
        return _member_key(name, choice.selection.name)

    def members(self, name: str) -> list[str]:
        return [_member_key(name, sym.name) for sym in self.kconf.named_choices[name].syms]

    def axis(self, name: str) -> tuple[str, ...]:
        """A matrix axis: the choice when <NAME>_MULTIPLE is off, else every enabled member."""
        if not self.bool(f"{name}_MULTIPLE"):
            picked = self.choice(name)
            for key in self.members(name):  # the MULTIPLE flags are read either way
                self.bool(_enable_symbol(name, key))
            return (picked,)
        return tuple(k for k in self.members(name) if self.bool(_enable_symbol(name, k)))


def _enable_symbol(axis: str, key: str) -> str:
    return f"{axis}_ENABLE_{key.upper().replace('-', '_')}"


def _member_key(choice: str, member: str) -> str:
    return member[len(choice) + 1:].lower().replace("_", "-")


def _build(r: _Reader, path: Path, overrides: dict[str, str]) -> Config:
    models = r.axis("MODEL")
    optimizers = r.axis("OPTIMIZER")
    prunings = r.axis("PRUNING")
    sparsities = _sparsities(r)
    train = _train(r)
    _require_nonempty(models=models, optimizers=optimizers, prunings=prunings)
    if any(p != "none" for p in prunings) and not sparsities:
        raise ConfigError("no target sparsity enabled: enable one of CONFIG_SPARSITY_ENABLE_* or turn off "
                          "CONFIG_SPARSITY_MULTIPLE")
    first_seed = r.int("SEED")
    return Config(
        path=str(path),
        models=models,
        optimizers=optimizers,
        prunings=prunings,
        sparsities=sparsities,
        seeds=tuple(range(first_seed, first_seed + r.int("SEEDS"))),
        optim={name: _optim(r, name) for name in optimizers},
        prune=_prune(r),
        train=train,
        model_options={m: _model_options(r, m) for m in models},
        device=r.choice("DEVICE"),
        cpu_threads=r.int("CPU_THREADS"),
        jobs=r.int("MATRIX_JOBS"),
        tracker=r.choice("TRACKER"),
        results_dir=r.str("RESULTS_DIR") or "results",
        results_name=r.str("RESULTS_NAME"),
        data_dir=r.str("DATA_DIR") or "data",
        overrides=overrides,
        text=path.read_text(),
    )


def _require_nonempty(**axes: tuple[str, ...]) -> None:
    for axis, values in axes.items():
        if not values:
            symbol = axis[:-1].upper()
            raise ConfigError(f"no {axis[:-1]} enabled: enable one of CONFIG_{symbol}_ENABLE_* or turn off "
                              f"CONFIG_{symbol}_MULTIPLE")


def _sparsities(r: _Reader) -> tuple[float, ...]:
    enabled = {pct: r.bool(f"SPARSITY_ENABLE_{pct}") for pct in SPARSITY_CHOICES}
    if r.bool("SPARSITY_MULTIPLE"):
        r.sym("TARGET_SPARSITY")
        return tuple(pct / 100 for pct, on in enabled.items() if on)
    return (r.float("TARGET_SPARSITY", 0.0, 1.0, open_low=True, open_high=True),)


def _optim(r: _Reader, name: str) -> OptimSettings:
    prefix = name.upper()
    lr = r.float(f"{prefix}_LR", 0.0, open_low=True)
    decay = r.float(f"{prefix}_WEIGHT_DECAY", 0.0)
    if name == "sgd":
        return OptimSettings(name, lr, decay, momentum=r.float("SGD_MOMENTUM", 0.0, 1.0, open_high=True),
                             nesterov=r.bool("SGD_NESTEROV"))
    return OptimSettings(
        name, lr, decay,
        beta1=r.float(f"{prefix}_BETA1", 0.0, 1.0, open_high=True),
        beta2=r.float(f"{prefix}_BETA2", 0.0, 1.0, open_high=True),
        eps=r.float(f"{prefix}_EPS", 0.0, open_low=True),
    )


def _prune(r: _Reader) -> PruneSettings:
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
        threshold=r.choice("PRUNING_THRESHOLD"),
    )


def _step_or_fraction(r: _Reader, name: str) -> int | float:
    text = r.str(name).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"\d*\.\d*", text) and text != "." and 0.0 <= float(text) <= 1.0:
        return float(text)
    raise ConfigError(f"CONFIG_{name}={text!r}: give a step (e.g. 1000) or a fraction of the run "
                      f"with a decimal point (e.g. 0.25)")


def _train(r: _Reader) -> TrainSettings:
    settings = TrainSettings(
        batch_size=r.int("BATCH_SIZE"),
        epochs=r.int("EPOCHS"),
        max_iters=r.int("MAX_ITERS"),
        time_budget_s=parse_duration(r.str("TIME_BUDGET")),
        min_lr_ratio=r.float("MIN_LR_RATIO", 0.0, 1.0),
        warmup_steps=r.int("WARMUP_STEPS"),
        grad_clip=r.float("GRAD_CLIP", 0.0),
        eval_interval=r.int("EVAL_INTERVAL"),
        log_interval=r.int("LOG_INTERVAL"),
        deterministic=r.bool("DETERMINISTIC"),
        keep_checkpoints=r.bool("KEEP_CHECKPOINTS"),
    )
    if not (settings.epochs or settings.max_iters or settings.time_budget_s):
        raise ConfigError("no training budget: CONFIG_EPOCHS, CONFIG_MAX_ITERS and CONFIG_TIME_BUDGET are all 0; "
                          "set one (e.g. `make EPOCHS=5`)")
    return settings


def _model_options(r: _Reader, model: str) -> dict[str, Any]:
    """Every symbol defined in <model>/Kconfig, keyed by name minus the model prefix, lowercased."""
    prefix = model.upper() + "_"
    options: dict[str, Any] = {}
    own_file = f"{model}/Kconfig"
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
