"""lib/config/__init__.py: typed values, every validation error, and the dead-symbol check."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import kconfiglib
import pytest

from lib import config
from lib.core.errors import ConfigError, HarnessError
from tests.conftest import ROOT, resolve_defconfig

QUICK = (ROOT / "defconfigs" / "lenet5-quick").read_text()
QUICK_NO_SGD = "".join(line for line in QUICK.splitlines(keepends=True) if "SGD" not in line)


def test_quick_defconfig_types(make_config):
    cfg = config.load(make_config(QUICK))
    assert cfg.models == ("lenet5",)
    assert cfg.optimizers == ("sgd", "adamw", "adamwprune")
    assert cfg.prunings == ("none", "magnitude", "state")
    assert cfg.variants == ("bitter7",)
    assert cfg.sparsities == (0.5, 0.7, 0.9)
    assert cfg.seeds == (1,)
    assert cfg.optim["adamw"].lr == pytest.approx(3e-3) and isinstance(cfg.optim["adamw"].lr, float)
    assert cfg.optim["sgd"].momentum == pytest.approx(0.9)
    assert cfg.prune.schedule == "cubic" and cfg.prune.start == 0.1 and cfg.prune.frequency == 10
    assert cfg.train.epochs == 15 and cfg.train.grad_clip == 1.0
    assert cfg.model_options == {"lenet5": {"dataset": "mnist5k"}}
    assert cfg.hardware.device == "cpu" and cfg.jobs == 2 and cfg.tracker == "none"


def test_single_axes_and_steps(make_config):
    cfg = config.load(make_config('CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="0.8"\n'
                                  'CONFIG_PRUNING_START="100"\nCONFIG_PRUNING_END="0.5"\n'
                                  "CONFIG_PRUNING_SCHEDULE_CUBIC_LATE=y\nCONFIG_SEEDS=3\nCONFIG_SEED=7\n"))
    assert cfg.prunings == ("magnitude",) and cfg.sparsities == (0.8,)
    assert cfg.prune.start == 100 and isinstance(cfg.prune.start, int) and cfg.prune.end == 0.5
    assert cfg.prune.schedule == "cubic-late"
    assert cfg.seeds == (7, 8, 9)


def test_overrides_apply_and_are_validated(make_config):
    path = make_config(QUICK)
    cfg = config.load(path, {"MAX_ITERS": "20", "TIME_BUDGET": "2m", "SEEDS": "2", "EPOCHS": "3"})
    assert cfg.train.max_iters == 20 and cfg.train.time_budget_s == 120 and cfg.seeds == (1, 2)
    assert cfg.train.epochs == 3 and cfg.overrides["MAX_ITERS"] == "20"
    with pytest.raises(ConfigError, match="CONFIG_SEEDS=1000 is outside its range"):
        config.load(path, {"SEEDS": "1000"})
    with pytest.raises(ConfigError, match="takes a whole number"):
        config.load(path, {"EPOCHS": "many"})
    with pytest.raises(ConfigError, match="no such symbol"):
        config.load(path, {"NOPE": "1"})


@pytest.mark.parametrize("extra, message", [
    ("CONFIG_EPOCHS=0\nCONFIG_MAX_ITERS=0\n",
     r"CONFIG_EPOCHS=0 is outside its range \[1, 100000\] while MAX_ITERS = 0"),
    ('CONFIG_EPOCHS=0\nCONFIG_MAX_ITERS=0\nCONFIG_TIME_BUDGET="0s"\n', "no training budget"),
    ('CONFIG_TIME_BUDGET="5"\n', "CONFIG_TIME_BUDGET='5' has no unit: write 5s, 5m or 5h"),
    ("CONFIG_SEEDS=0\n", r"CONFIG_SEEDS=0 is outside its range \[1, 100\]"),
    ("CONFIG_EPOCHS=abc\n", "the value 'abc' is invalid for EPOCHS"),
    ('CONFIG_ADAMW_LR="fast"\n', "CONFIG_ADAMW_LR='fast' is not a number"),
    ('CONFIG_ADAMW_LR="-1"\n', "CONFIG_ADAMW_LR=-1 is outside"),
    ('CONFIG_ADAMW_BETA2="1.0"\n', "CONFIG_ADAMW_BETA2=1.0 is outside"),
    ('CONFIG_TIME_BUDGET="soon"\n', "CONFIG_TIME_BUDGET='soon' is not a duration"),
    ('CONFIG_PRUNING_START="0.8"\nCONFIG_PRUNING_END="0.2"\n', "CONFIG_PRUNING_END=0.2 comes before"),
    ('CONFIG_PRUNING_START="1.5"\n', "CONFIG_PRUNING_START='1.5': give a step"),
    ("CONFIG_NO_SUCH_SYMBOL=y\n", "CONFIG_NO_SUCH_SYMBOL=y is not a symbol of this Kconfig tree"),
    # Shares the OPTIMIZER choice's prefix but not a member's name: the generic line, not a choice value.
    ("CONFIG_OPTIMIZER_ENABLE_FOO=y\n", "CONFIG_OPTIMIZER_ENABLE_FOO=y is not a symbol of this Kconfig tree"),
    ("CONFIG_MODEL_FOO=y\n", r"CONFIG_MODEL_FOO=y: 'foo' is not a CONFIG_MODEL value \(valid: lenet5, "),
    ("CONFIG_ADAM_LR=\"1e-3\"\n", "CONFIG_ADAM_LR has no effect: it depends on OPTIMIZER_ADAM"),
    # Compact optimizer state exists for Adam, AdamW and AdamWPrune only (lib/optim/compact.py).
    ("CONFIG_COMPACT_STATE=y\n", "CONFIG_COMPACT_STATE=y has no effect: it depends on "),  # SGD is in the matrix

    ('CONFIG_TARGET_SPARSITY="0.5"\n', "CONFIG_TARGET_SPARSITY has no effect"),
    ("CONFIG_OPTIMIZER_ENABLE_SGD=n\nCONFIG_OPTIMIZER_ENABLE_ADAMW=n\nCONFIG_OPTIMIZER_ENABLE_ADAMWPRUNE=n\n",
     "CONFIG_OPTIMIZER_ENABLE_ADAMW=n has no effect: it can be turned off only when"),
    ("CONFIG_SPARSITY_ENABLE_50=n\nCONFIG_SPARSITY_ENABLE_70=n\nCONFIG_SPARSITY_ENABLE_90=n\n",
     "CONFIG_SPARSITY_ENABLE_50=n has no effect: it can be turned off only when"),
    ("this line is garbage\n", "malformed"),
])
def test_bad_values_give_one_clear_line(make_config, extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.load(make_config(QUICK, extra))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("line, message", [
    ("CONFIG_PRUNING_SCHEDULE_LINEAR=y\n",
     r"CONFIG_PRUNING_SCHEDULE_CUBIC=y \(line \d+\) and CONFIG_PRUNING_SCHEDULE_LINEAR=y \(line \d+\) are both "
     r"members of the choice 'Sparsity schedule'"),
    ("CONFIG_MAX_ITERS=20\n", r"CONFIG_MAX_ITERS is set twice \(lines \d+ and \d+\)"),
    ("CONFIG_MODEL_GPT2=y\n",
     r"CONFIG_MODEL_LENET5=y \(line \d+\) and CONFIG_MODEL_GPT2=y \(line \d+\) are both members of the choice "
     r"'Model'"),
])
def test_conflicting_lines_are_refused_naming_both(tmp_path, line, message):
    """Kconfig keeps the last of two lines without a word; the reader and the defconfig writer refuse them."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import kconfig_tool

    full = resolve_defconfig(QUICK, tmp_path / ".config")
    full.write_text(full.read_text() + line)  # appended raw, as an editor would leave it
    with pytest.raises(ConfigError, match=message) as info:
        config.load(full)
    assert "\n" not in str(info.value) and "LENET5_DATASET" not in str(info.value)
    with pytest.raises(HarnessError, match=message):
        kconfig_tool.write_defconfig(full, tmp_path / "out.config", "defconfigs/mine")
    assert not (tmp_path / "out.config").exists()


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan", "half"])
def test_target_sparsity_must_be_inside_zero_one(make_config, value):
    path = make_config(f'CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="{value}"\n')
    with pytest.raises(ConfigError, match="CONFIG_TARGET_SPARSITY"):
        config.load(path)


def test_bool_with_unmet_dependency_is_refused(make_config):
    message = "CONFIG_OPTIMIZER_ENABLE_SGD=y has no effect: it depends on OPTIMIZER_MULTIPLE"
    with pytest.raises(ConfigError, match=message):
        config.load(make_config("", "CONFIG_OPTIMIZER_ENABLE_SGD=y\n"))


def test_missing_config_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"run `make defconfig-<name>` first"):
        config.load(tmp_path / ".config")


def test_duration_parsing():
    assert config.parse_duration("90s") == 90 and config.parse_duration("30m") == 1800
    assert config.parse_duration("1.5h") == 5400 and config.parse_duration("0") == 0
    assert config.parse_duration("1h 30m") == 5400 and config.parse_duration("1h30m") == 5400
    assert config.parse_duration("2m 5s") == 125 and config.parse_duration(" 0 ") == 0
    for bad, line in (("45", "has no unit: write 45s, 45m or 45h"), ("1.5", "write 1.5s, 1.5m or 1.5h"),
                      ("30m 1h", "is not a duration"), ("h", "is not a duration"), ("", "is not a duration")):
        with pytest.raises(ConfigError, match=line):
            config.parse_duration(bad)


def test_binary_or_empty_config_is_one_line(tmp_path):
    binary = tmp_path / "binary.config"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.config"
    empty.write_text("\n# just a comment\n")
    for path, line in ((binary, "is not a text .config"), (empty, "is empty (no CONFIG_ lines)")):
        with pytest.raises(ConfigError, match=re.escape(line)) as info:
            config.load(path)
        assert "\n" not in str(info.value)


def _reads(path: Path) -> set[str]:
    try:
        return config.load_with_reads(path)[1]
    except ConfigError:
        return set()


def _allyes(tmp_path: Path, choose: kconfiglib.Symbol | None = None) -> Path:
    """allyesconfig, optionally with one choice member selected, written to a file."""
    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    for sym in kconf.unique_defined_syms:  # every bool on: every menu visible
        if sym.orig_type == kconfiglib.BOOL and not sym.choice:
            sym.set_value(2)
    if choose is not None:
        kconf.syms[choose.name].set_value(2)
    kconf.syms["DIST_RDZV_ENDPOINT"].set_value("127.0.0.1:29500")  # multi-node on needs one (no default)
    path = tmp_path / f"allyes-{choose.name if choose else 'plain'}"
    kconf.write_config(str(path), save_old=False)
    return path


def test_every_symbol_is_read(tmp_path):
    """Dead-symbol check: a symbol nothing reads is a setting that never reaches the trainer.

    Loads allyesconfig, then allyesconfig with each choice member selected in turn
    (so the symbols that only one choice makes visible are reached), then every defconfig.
    """
    read = _reads(_allyes(tmp_path))
    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    for choice in kconf.unique_choices:
        for member in choice.syms:
            read |= _reads(_allyes(tmp_path, member))
    for defconfig in sorted((ROOT / "defconfigs").iterdir()):
        read |= _reads(resolve_defconfig(defconfig.read_text(), tmp_path / defconfig.name))
    missing = config.all_symbol_names() - read
    assert not missing, f"symbols nothing reads: {sorted(missing)}"


def test_every_symbol_and_choice_has_help():
    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    items = list(kconf.unique_defined_syms) + list(kconf.unique_choices)
    without = [getattr(i, "name", None) or str(i) for i in items if not any(n.help for n in i.nodes)]
    assert not without, f"no help text: {without}"
    assert not kconf.warnings, kconf.warnings


def test_kconfig_names_match_the_registries():
    from lib.core.task import TASKS
    from lib.optim import OPTIMIZERS
    from lib.pruning import PRUNERS

    text = "".join(p.read_text() for p in ROOT.glob("**/Kconfig*") if ".venv" not in p.parts)
    for prefix, registry in (("OPTIMIZER", OPTIMIZERS), ("PRUNING", PRUNERS), ("MODEL", TASKS)):
        names = set(re.findall(rf"^config {prefix}_ENABLE_(\w+)$", text, re.M))
        assert {n.lower().replace("_", "-") for n in names} == set(registry), prefix  # kconf.member_key


def test_config_fields_are_used_outside_the_reader():
    """Every Config field must be consumed by the matrix, the CLI or the trainer."""
    used = "".join(p.read_text() for p in (ROOT / "lib").rglob("*.py") if p.parent.name != "config")
    fields = config.Config.__dataclass_fields__
    unused = [f for f in fields if f not in ("path",) and not re.search(rf"config\.{f}\b", used)]
    assert not unused, f"Config fields nothing uses: {unused}"


def test_state_pruning_needs_adamwprune(make_config):
    line = "CONFIG_PRUNING_STATE=y has no effect: it depends on (OPTIMIZER_ADAMWPRUNE || OPTIMIZER_ENABLE_ADAMWPRUNE);"
    with pytest.raises(ConfigError, match=re.escape(line)):
        config.load(make_config("", "CONFIG_PRUNING_STATE=y\n"))


def test_adamwprune_alone_with_magnitude_is_refused(make_config):
    line = "CONFIG_PRUNING_MAGNITUDE=y has no effect: it depends on !(OPTIMIZER_ADAMWPRUNE"
    with pytest.raises(ConfigError, match=re.escape(line)):
        config.load(make_config("CONFIG_OPTIMIZER_ADAMWPRUNE=y\n", "CONFIG_PRUNING_MAGNITUDE=y\n"))


@pytest.mark.parametrize("theta", ["0", "-5"])
def test_spam_theta_must_be_positive(make_config, theta):
    with pytest.raises(ConfigError, match="CONFIG_SPAM_THETA"):
        config.load(make_config(f'CONFIG_OPTIMIZER_ADAMWSPAM=y\nCONFIG_SPAM_THETA="{theta}"\n'))


def test_spam_defaults_follow_the_form(make_config):
    released = config.load(make_config("CONFIG_OPTIMIZER_ADAMWSPAM=y\n")).optim["adamwspam"]
    assert (released.spam_form, released.spam_theta, released.spam_interval, released.spam_warmup,
            released.spam_accu) == ("released", 5000, 500, 150, 20)
    accu = config.load(make_config("CONFIG_OPTIMIZER_ADAMWSPAM=y\nCONFIG_SPAM_ACCU=7\n")).optim["adamwspam"]
    assert accu.spam_accu == 7
    assert released.eps == 1e-6
    knlp = config.load(make_config("CONFIG_OPTIMIZER_ADAMWSPAM=y\nCONFIG_SPAM_FORM_KNLP=y\n")).optim["adamwspam"]
    assert (knlp.spam_form, knlp.spam_theta, knlp.spam_interval) == ("knlp", 50, 1000)


@pytest.mark.parametrize("member", ["PAPER", "FOO"])  # PAPER: an old .config from before the form was removed
def test_unknown_spam_form_names_it_and_lists_the_forms(make_config, member):
    path = make_config("CONFIG_OPTIMIZER_ADAMWSPAM=y\n")
    text = path.read_text()
    assert "CONFIG_SPAM_FORM_RELEASED=y\n" in text and "CONFIG_SPAM_ACCU=20\n" in text
    # As the old form wrote it: its member set, the default one off, SPAM_ACCU (released only) absent.
    text = text.replace("CONFIG_SPAM_FORM_RELEASED=y\n",
                        f"# CONFIG_SPAM_FORM_RELEASED is not set\nCONFIG_SPAM_FORM_{member}=y\n")
    path.write_text(text.replace("CONFIG_SPAM_ACCU=20\n", ""))
    line = (f"CONFIG_SPAM_FORM_{member}=y: {member.lower()!r} is not a CONFIG_SPAM_FORM value "
            f"(valid: released, knlp)")
    with pytest.raises(ConfigError, match=re.escape(line)) as info:
        config.load(path)
    assert "\n" not in str(info.value)


def test_adamwprune_on_spam_base_reads_spam_settings(make_config):
    cfg = config.load(make_config("CONFIG_OPTIMIZER_ADAMWPRUNE=y\nCONFIG_ADAMWPRUNE_BASE_ADAMWSPAM=y\n"
                                  "CONFIG_PRUNING_STATE=y\nCONFIG_ADAMWPRUNE_VARIANT_BITTER8=y\n"
                                  "CONFIG_ADAMWPRUNE_BITTER8_FORM_KNLP=y\n"))
    opt = cfg.optim["adamwprune"]
    assert opt.base == "adamwspam" and opt.spam_theta == 5000
    assert cfg.variants == ("bitter8",) and cfg.prune.bitter8_form == "knlp"


def test_variant_axis_and_method_options(make_config):
    cfg = config.load(make_config(
        "CONFIG_OPTIMIZER_MULTIPLE=y\nCONFIG_OPTIMIZER_ENABLE_ADAMWPRUNE=y\nCONFIG_PRUNING_MULTIPLE=y\n"
        "CONFIG_PRUNING_ENABLE_MOVEMENT=y\nCONFIG_PRUNING_ENABLE_STATE=y\nCONFIG_ADAMWPRUNE_VARIANT_MULTIPLE=y\n"
        "CONFIG_ADAMWPRUNE_VARIANT_ENABLE_BITTER0=y\nCONFIG_MOVEMENT_FORM_KNLP=y\n"
        "CONFIG_PRUNING_IMPORTANCE_GRADIENT_SENSITIVITY=y\nCONFIG_PRUNING_THRESHOLD_SAMPLED=y\n"
        'CONFIG_PRUNING_SAMPLE_TOLERANCE="0.05"\n'))
    assert cfg.variants == ("bitter0", "bitter7")
    assert cfg.prune.movement_form == "knlp" and cfg.prune.importance == "gradient-sensitivity"
    assert cfg.prune.threshold == "sampled" and cfg.prune.sample_tolerance == 0.05


@pytest.mark.parametrize("extra, message", [
    ('CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_PRUNING_THRESHOLD_SAMPLED=y\nCONFIG_PRUNING_SAMPLE_TOLERANCE="0"\n',
     "CONFIG_PRUNING_SAMPLE_TOLERANCE=0 is outside"),
    ('CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_PRUNING_THRESHOLD_SAMPLED=y\nCONFIG_PRUNING_SAMPLE_TOLERANCE="11"\n',
     "CONFIG_PRUNING_SAMPLE_TOLERANCE=11 is outside"),
    ('CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_PRUNING_THRESHOLD_SAMPLED=y\nCONFIG_PRUNING_SAMPLE_TOLERANCE="tight"\n',
     "CONFIG_PRUNING_SAMPLE_TOLERANCE='tight' is not a number"),
    ("CONFIG_ACTIVATION_CKPT_UNIFORM=y\nCONFIG_ACTIVATION_CKPT_EVERY=0\n",
     r"CONFIG_ACTIVATION_CKPT_EVERY=0 is outside its range \[1, 1024\]"),
    ("CONFIG_ACTIVATION_CKPT_EVERY=3\n", "CONFIG_ACTIVATION_CKPT_EVERY has no effect"),
    ("CONFIG_FUSED_STEP_FAST=y\n", r"'fast' is not a CONFIG_FUSED_STEP value \(valid: auto, on, off\)"),
])
def test_issue_12_and_13_settings_refuse_bad_values(make_config, extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.load(make_config("", extra))
    assert "\n" not in str(info.value)


def test_compact_state_reaches_the_runspec(make_config):
    loaded = config.load(make_config(QUICK_NO_SGD, "CONFIG_COMPACT_STATE=y\n"))
    assert loaded.optimizers == ("adamw", "adamwprune")
    assert all(settings.compact_state for settings in loaded.optim.values())
    with pytest.raises(ConfigError, match="CONFIG_COMPACT_STATE=y has no effect: it depends on .*FUSED_STEP_OFF"):
        config.load(make_config(QUICK_NO_SGD, "CONFIG_ADAMWPRUNE_BASE_ADAMWSPAM=y\nCONFIG_FUSED_STEP_OFF=y\n"
                                              "CONFIG_COMPACT_STATE=y\n"))
    assert not any(s.compact_state for s in config.load(make_config(QUICK, "")).optim.values())
