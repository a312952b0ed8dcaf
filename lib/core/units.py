"""Byte counts as text: the one formatter that reports, plan rationales and error lines share."""

from __future__ import annotations

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def mib(n: float, digits: int = 1) -> str:
    """``n`` bytes in MiB: "12.3 MiB"."""
    return f"{n / MIB:.{digits}f} MiB"


def gib(n: float, digits: int = 1) -> str:
    """``n`` bytes in GiB: "1.4 GiB"."""
    return f"{n / GIB:.{digits}f} GiB"


def kib_or_mib(n: float, digits: int = 1, kib_digits: int | None = None) -> str:
    """``n`` bytes in KiB below 1 MiB (``kib_digits`` decimals, else ``digits``), in MiB from there."""
    if n < MIB:
        return f"{n / KIB:.{digits if kib_digits is None else kib_digits}f} KiB"
    return mib(n, digits)
