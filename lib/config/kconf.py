"""kconfiglib plumbing for lib/config/__init__.py: open the tree, refuse what kconfiglib only warns about, typed reads.

Only lib/config/__init__.py (the one reader of .config) and the config-writing script use this.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import kconfiglib

from lib.core import ROOT
from lib.core.errors import ConfigError

KCONFIG = ROOT / "Kconfig"


def open_kconfig() -> kconfiglib.Kconfig:
    os.environ["srctree"] = str(ROOT)  # `source` paths are relative to the project root
    try:
        kconf = kconfiglib.Kconfig(str(KCONFIG), warn_to_stderr=False, suppress_traceback=False)
    except kconfiglib.KconfigError as exc:
        raise ConfigError(f"the Kconfig tree does not parse: {str(exc).splitlines()[0]}") from None
    kconf.warnings.clear()
    return kconf


_FATAL_WARNINGS = ("is not a valid value", "is invalid for", "malformed", "outside the active range")


def raise_on_load_warnings(kconf: kconfiglib.Kconfig, path: Path | str) -> None:
    """Refuse what loading ``path`` only warned about: unknown symbols or choice members, bad values."""
    _refuse_unknown_choice_members(kconf, path)
    for name, value in kconf.missing_syms:
        raise ConfigError(f"{path}: CONFIG_{name}={value} is not a symbol of this Kconfig tree (a typo, or "
                          f"renamed?); remove it or run `make olddefconfig`")
    for warning in kconf.warnings:
        if any(key in warning for key in _FATAL_WARNINGS):
            text = warning.split("warning: ", 1)[-1]
            raise ConfigError(f"{path}: {text}; fix it with `make menuconfig` or a defconfig target")


SETTING_LINE = re.compile(r"^(?:CONFIG_(\w+)=(.*)|# CONFIG_(\w+) is not set)$")


def refuse_conflicting_lines(kconf: kconfiglib.Kconfig, text: str, path: Path | str) -> None:
    """A symbol set twice, or two members of one choice set to y: kconfiglib keeps the last line without a word
    (its "set more than once" warning is swallowed), so the file would not mean what it says. One line naming
    both lines."""
    choice_of = {sym.name: choice for choice in kconf.unique_choices for sym in choice.syms}
    seen: dict[str, int] = {}
    chosen: dict[int, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = SETTING_LINE.match(line.strip())
        if not match:
            continue
        name, value = (match[1], match[2]) if match[1] else (match[3], "n")
        choice = choice_of.get(name)
        if choice is not None and value.strip() == "y":  # checked first: the clearer of the two complaints
            if id(choice) in chosen:
                other, at = chosen[id(choice)]
                prompt = choice.nodes[0].prompt[0] if choice.nodes and choice.nodes[0].prompt else choice.name
                raise ConfigError(f"{path}: CONFIG_{other}=y (line {at}) and CONFIG_{name}=y (line {number}) are "
                                  f"both members of the choice '{prompt}', which takes one; keep one "
                                  f"(make menuconfig shows the choice)")
            chosen[id(choice)] = (name, number)
        if name in seen:
            raise ConfigError(f"{path}: CONFIG_{name} is set twice (lines {seen[name]} and {number}) and the last "
                              f"would silently win; keep one")
        seen[name] = number


def apply_overrides(kconf: kconfiglib.Kconfig, overrides: Mapping[str, str]) -> None:
    for name, value in overrides.items():
        sym = kconf.syms.get(name)
        if sym is None or not sym.nodes:
            raise ConfigError(f"override {name}={value}: no such symbol in the Kconfig tree")
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and not re.fullmatch(r"-?\d+", value):
            raise ConfigError(f"override {name}={value!r}: CONFIG_{name} takes a whole number")
        sym.set_value(value)


def check_user_values(kconf: kconfiglib.Kconfig) -> None:
    """Refuse settings that kconfiglib would silently ignore or replace."""
    for sym in kconf.unique_defined_syms:
        asked = sym.user_value
        if asked is None:
            continue
        if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
            _check_bool(sym, asked)
            continue
        if sym.visibility == 0:
            raise ConfigError(f"CONFIG_{sym.name} has no effect: it depends on {_deps(sym)}; "
                              f"set that too or drop it")
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and int(asked, 0) != int(sym.str_value, 0):
            low, high, cond = _int_range(sym)
            where = f" while {cond}" if cond else ""
            raise ConfigError(
                f"CONFIG_{sym.name}={asked} is outside its range [{low}, {high}]{where}; "
                f"pick a value in range (make menuconfig)"
            )


def _check_bool(sym: kconfiglib.Symbol, asked: int) -> None:
    """A bool the user set that Kconfig overrode: unmet dependency, or kept on to keep the matrix valid."""
    if sym.choice:
        if sym.choice.user_selection is sym and sym.choice.selection is not sym:
            raise ConfigError(f"CONFIG_{sym.name}=y has no effect: it depends on {_deps(sym)}; "
                              f"change that or choose another member")
        return
    if asked and not sym.tri_value:
        raise ConfigError(f"CONFIG_{sym.name}=y has no effect: it depends on {_deps(sym)}; "
                          f"set that too or drop the line")
    if not asked and sym.tri_value:
        prompt = sym.nodes[0].prompt
        when = kconfiglib.expr_str(prompt[1]) if prompt else "never"
        raise ConfigError(f"CONFIG_{sym.name}=n has no effect: it can be turned off only when {when} "
                          f"(the matrix needs one); change that or drop the line")


def _deps(sym: kconfiglib.Symbol) -> str:
    """The symbol's dependencies as the user wrote them (a choice member's own choice left out)."""
    text = kconfiglib.expr_str(sym.direct_dep)
    return re.sub(r" && <choice \w+>$", "", text)


def _int_range(sym: kconfiglib.Symbol) -> tuple[str, str, str]:
    """The active range of ``sym`` and its condition ("" when unconditional)."""
    for low, high, cond in sym.ranges:
        if kconfiglib.expr_value(cond):
            own = cond in (sym.kconfig.y, sym.direct_dep)  # ranges carry the symbol's own dependencies too
            return low.str_value, high.str_value, "" if own else kconfiglib.expr_str(cond)
    return "?", "?", ""


class Reader:
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
        return member_key(name, choice.selection.name)

    def members(self, name: str) -> list[str]:
        syms = self.kconf.named_choices[name].syms
        self.read.update(sym.name for sym in syms)
        return [member_key(name, sym.name) for sym in syms]

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


def member_key(choice: str, member: str) -> str:
    return member[len(choice) + 1:].lower().replace("_", "-")


def _refuse_unknown_choice_members(kconf: kconfiglib.Kconfig, path: Path | str) -> None:
    """``CONFIG_<CHOICE>_<X>=y`` where X is no member of the choice: name X and list the valid members.

    kconfiglib ignores such a line and keeps the choice's default; raise_on_load_warnings would
    refuse it too, but without the valid values. A name that merely shares a choice's prefix with
    other symbols (OPTIMIZER_ENABLE_..., MODEL_MULTIPLE) is left to that generic check.
    """
    for name, value in kconf.missing_syms:
        if value != "y":
            continue
        owners = [c for c in kconf.named_choices if name.startswith(c + "_")]
        if not owners:
            continue
        choice_name = max(owners, key=len)
        choice = kconf.named_choices[choice_name]
        word = name[len(choice_name) + 1:].split("_")[0]
        stem = f"{choice_name}_{word}"
        members = {sym.name for sym in choice.syms}
        if any(sym.name == stem or sym.name.startswith(stem + "_")
               for sym in kconf.unique_defined_syms if sym.name not in members):
            continue
        valid = ", ".join(member_key(choice_name, sym.name) for sym in choice.syms)
        raise ConfigError(f"{path}: CONFIG_{name}=y: {member_key(choice_name, name)!r} is not a "
                          f"CONFIG_{choice_name} value (valid: {valid}); pick one of those with "
                          f"`make menuconfig` or a defconfig target")
