"""Errors the user can fix. Each carries one line saying what is wrong and how to fix it.

Entry points catch HarnessError, print its message on one line and exit non-zero;
anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Interrupted(HarnessError):
    """Ctrl-C or SIGTERM stopped a matrix: its runs were stopped after a checkpoint (`make continue`)."""

    def __init__(self, signal_name: str, checkpointed: int, waiting: int) -> None:
        super().__init__(f"{signal_name}: {checkpointed} run(s) stopped after a checkpoint, {waiting} not started")
        self.signal_name, self.checkpointed, self.waiting = signal_name, checkpointed, waiting


class ConfigError(HarnessError):
    """A .config value that is missing, malformed, out of range or inconsistent."""


class DataMissingError(HarnessError):
    """A dataset that has not been prepared; the message names the make target."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type name when it has none), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def number(text: str, complaint: str) -> float:
    """``text`` as a float; a ConfigError saying ``complaint`` when it is not one."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(complaint) from None
