"""Config-writing helpers kconfiglib does not ship: named defconfigs and randconfig.

python scripts/kconfig_tool.py list | defconfig NAME | randconfig | set "SYMBOL=VALUE [SYMBOL=VALUE ...]"
The target file is $KCONFIG_CONFIG (default .config). Reading and validating
stays in lib/config/__init__.py, which every written file is checked against.

randconfig randomises the experiment: every bool and choice, and each int within
its range near its default. Strings keep their defaults (Kconfig gives their
float/duration/path values no range to draw from; lib/config/__init__.py checks them).
The machine settings (lib/hardware/Kconfig, and the seeds and side-by-side jobs
of lib/matrix/Kconfig) keep their defaults too: whether 8 ranks or 4 jobs are
valid depends on the machine, which Kconfig cannot see. The Kconfig
dependencies make every such config valid; should one still fail to load,
randconfig says so and tries the next seed (at most RETRIES times).
"""

from __future__ import annotations

import difflib
import os
import random
import re
import shlex
import sys
from pathlib import Path

import kconfiglib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.config import Config, load  # noqa: E402
from lib.config.kconf import check_user_values, open_kconfig, raise_on_load_warnings, refuse_conflicting_lines  # noqa: E402
from lib.core.errors import ConfigError, HarnessError  # noqa: E402

DEFCONFIGS = ROOT / "defconfigs"
# Where the experiment runs, not what it is: randconfig leaves these at their defaults, so every random config
# runs on the machine at hand (the Slurm executor would need a cluster).
MACHINE_FILES = ("lib/hardware/Kconfig", "lib/matrix/Kconfig", "lib/matrix/executors/Kconfig")
RETRIES = 10


def names() -> list[str]:
    return sorted(p.name for p in DEFCONFIGS.iterdir() if p.is_file())


def target() -> str:
    return os.environ.get("KCONFIG_CONFIG", ".config")


def defconfig(name: str) -> None:
    path = DEFCONFIGS / name
    if not path.is_file():
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
        hint = f"closest: {', '.join(close)}" if close else "see `make list-defconfigs`"
        raise HarnessError(f"no defconfig named {name!r} in defconfigs/; {hint}")
    write_defconfig(path, Path(target()), f"defconfigs/{name}")
    config = load(target())
    print(f"wrote {target()} from defconfigs/{name}: {_describe(config)}; now run `make` (or `make dry-run`)")


def set_values(text: str) -> None:
    """`make set CONFIG="MAX_ITERS=200 CONFIG_SPARSITY_LIST=30,60"`: change settings of the existing config, like
    the kernel's scripts/config (kconfiglib's setconfig), each checked as a .config line would be; a refused
    setting leaves the file as it was."""
    pairs = _assignments(text)
    path = Path(target())
    if not path.is_file():
        raise HarnessError(f"{path} does not exist; write one first (`make defconfig-<name>`), then `make set`")
    kconf = open_kconfig()
    try:
        refuse_conflicting_lines(kconf, path.read_text(), path)
    except ConfigError as exc:
        raise HarnessError(f"make set: {exc}; {path} is unchanged") from None
    kconf.load_config(str(path))
    for name, value in pairs:
        _set_one(kconf, name, value)
    try:
        check_user_values(kconf)
    except ConfigError as exc:
        raise HarnessError(f"make set: {exc}; {path} is unchanged") from None
    staged = path.with_name(f".{path.name}.set")
    kconf.write_config(str(staged), save_old=False)
    try:
        load(staged)  # the one reader's checks (values, lists, the matrix) before the file is replaced
    except ConfigError as exc:
        staged.unlink(missing_ok=True)
        raise HarnessError(f"make set: {exc}; {path} is unchanged") from None
    os.replace(staged, path)
    print(f"{path}: set {' '.join(f'CONFIG_{n}={v}' for n, v in pairs)}")


def _assignments(text: str) -> list[tuple[str, str]]:
    words = shlex.split(text)
    if not words:
        raise HarnessError('make set needs CONFIG="SYMBOL=VALUE [SYMBOL=VALUE ...]", e.g. make set '
                           'CONFIG="MAX_ITERS=200 SEEDS=3"')
    pairs = []
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise HarnessError(f"make set: {word!r} is not SYMBOL=VALUE (e.g. MAX_ITERS=200; several separated by "
                               f"spaces inside the quotes)")
        pairs.append((name.removeprefix("CONFIG_"), value))
    return pairs


def _set_one(kconf: kconfiglib.Kconfig, name: str, value: str) -> None:
    sym = kconf.syms.get(name)
    if sym is None or not sym.nodes:
        close = difflib.get_close_matches(name, [s.name for s in kconf.unique_defined_syms], n=3, cutoff=0.6)
        hint = f"closest: {', '.join('CONFIG_' + c for c in close)}" if close else "see `make menuconfig`"
        raise HarnessError(f"make set: CONFIG_{name} is not a symbol of this Kconfig tree; {hint}")
    if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        if value not in ("y", "n"):
            raise HarnessError(f"make set: CONFIG_{name}={value!r}: a yes/no setting takes y or n")
    elif sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and not re.fullmatch(r"-?\d+", value):
        raise HarnessError(f"make set: CONFIG_{name}={value!r} takes a whole number")
    if not sym.set_value(value):
        raise HarnessError(f"make set: CONFIG_{name}={value!r} is not a valid value for it (make menuconfig)")


def write_defconfig(source: Path, out: Path, label: str) -> None:
    """Resolve the defconfig-style file ``source`` into a full config at ``out`` (the one writer of them: make
    defconfig-<name>, and make gpu-check's temporary configs); what Kconfig would drop or override is refused."""
    kconf = open_kconfig()
    try:
        refuse_conflicting_lines(kconf, source.read_text(), label)
        kconf.load_config(str(source))
        raise_on_load_warnings(kconf, label)  # unknown symbols and choice members, bad values
        check_user_values(kconf)  # a line Kconfig would override is refused, not silently dropped
    except ConfigError as exc:
        text = str(exc)
        raise HarnessError(text if text.startswith(label) else f"{label}: {text}") from None
    kconf.write_config(str(out), save_old=False)


def randconfig() -> None:
    first = int(os.environ.get("KCONFIG_SEED", random.randrange(2**31)))
    for seed in range(first, first + RETRIES):
        write_random(seed, target())
        try:
            config = load(target())
        except ConfigError as exc:
            print(f"KCONFIG_SEED={seed} gave an invalid config ({exc}); trying {seed + 1}")
            continue
        print(f"wrote {target()} with KCONFIG_SEED={seed}")
        print(f"it is valid: {_describe(config)}")
        return
    raise HarnessError(f"{RETRIES} seeds from KCONFIG_SEED={first} on gave invalid configs (a Kconfig bug: "
                       f"the dependencies should prevent that); try another KCONFIG_SEED")


def write_random(seed: int, path: str | Path) -> None:
    """Write the random config of ``seed`` to ``path`` (the same seed always gives the same file)."""
    rng = random.Random(seed)
    kconf = open_kconfig()
    for choice in kconf.unique_choices:  # user values on hidden items are harmless: Kconfig ignores them
        if choice.nodes[0].filename not in MACHINE_FILES:
            choice.syms[rng.randrange(len(choice.syms))].set_value(2)
    for sym in kconf.unique_defined_syms:
        if not sym.choice and sym.nodes[0].filename not in MACHINE_FILES:
            _randomise(sym, rng)
    kconf.write_config(str(path), save_old=False)


def _randomise(sym: kconfiglib.Symbol, rng: random.Random) -> None:
    """A bool at random; an int in its range, within 1000 of its bottom or up to twice its default."""
    if sym.orig_type == kconfiglib.BOOL:
        sym.set_value(rng.choice((0, 2)))
    elif sym.orig_type == kconfiglib.INT and sym.ranges:
        bounds = [(int(lo.str_value), int(hi.str_value)) for lo, hi, _ in sym.ranges
                  if lo.str_value.lstrip("-").isdigit() and hi.str_value.lstrip("-").isdigit()]
        default = int(sym.str_value) if sym.str_value.lstrip("-").isdigit() else 0
        low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
        sym.set_value(str(rng.randint(low, min(high, max(low + 1000, 2 * default)))))


def _describe(config: Config) -> str:
    return (f"models {','.join(config.models)}; optimizers {','.join(config.optimizers)}; "
            f"pruning {','.join(config.prunings)}; sparsities {','.join(f'{s:g}' for s in config.sparsities)}; "
            f"{len(config.seeds)} seed(s)")


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["list"]:
            print("\n".join(names()))
        elif argv[:1] == ["defconfig"] and len(argv) == 2:
            defconfig(argv[1])
        elif argv[:1] == ["randconfig"]:
            randconfig()
        elif argv[:1] == ["set"] and len(argv) == 2:
            set_values(argv[1])
        else:
            print(__doc__.strip().splitlines()[2], file=sys.stderr)
            return 2
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
