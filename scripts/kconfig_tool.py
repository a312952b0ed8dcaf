"""Config-writing helpers kconfiglib does not ship: named defconfigs and randconfig.

python scripts/kconfig_tool.py list | defconfig NAME | randconfig
The target file is $KCONFIG_CONFIG (default .config). Reading and validating
stays in lib/config.py, which every written file is checked against.
"""

from __future__ import annotations

import difflib
import os
import random
import sys
from pathlib import Path

import kconfiglib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.config import load  # noqa: E402
from lib.errors import HarnessError  # noqa: E402
from lib.kconf import open_kconfig  # noqa: E402

DEFCONFIGS = ROOT / "defconfigs"


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
    kconf = open_kconfig()
    kconf.load_config(str(path))
    bad = [w for w in kconf.warnings if "undefined symbol" in w or "not a valid value" in w]
    if bad:
        raise HarnessError(f"defconfigs/{name}: {bad[0].split('warning: ', 1)[-1]}")
    kconf.write_config(target(), save_old=False)
    config = load(target())
    print(f"wrote {target()} from defconfigs/{name}: {_describe(config)}; now run `make` (or `make dry-run`)")


def randconfig() -> None:
    seed = int(os.environ.get("KCONFIG_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    kconf = open_kconfig()
    for node in kconf.node_iter():  # menu order: a parent is set before what depends on it
        item = node.item
        if isinstance(item, kconfiglib.Choice) and item.visibility:
            item.syms[rng.randrange(len(item.syms))].set_value(2)
        elif isinstance(item, kconfiglib.Symbol) and not item.choice and item.visibility:
            _randomise(item, rng)
    kconf.write_config(target(), save_old=False)
    print(f"wrote {target()} with KCONFIG_SEED={seed}")
    config = load(target())  # a random config must load or fail with one clear line
    print(f"it is valid: {_describe(config)}")


def _randomise(sym: kconfiglib.Symbol, rng: random.Random) -> None:
    if sym.orig_type == kconfiglib.BOOL:
        sym.set_value(rng.choice((0, 2)))
    elif sym.orig_type == kconfiglib.INT and sym.ranges:
        low, high = (int(v.str_value) for v in sym.ranges[0][:2])
        sym.set_value(str(rng.randint(low, min(high, low + 1000))))


def _describe(config: object) -> str:
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
        else:
            print(__doc__.strip().splitlines()[2], file=sys.stderr)
            return 2
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
