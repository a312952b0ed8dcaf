"""Experiment tracking behind one small interface: "none", "wandb" or "trackio" (CONFIG_TRACKER_*).

A tracker receives each evaluation record (``log``) and is closed once (``finish``);
only rank 0 talks to one. The results folder is the record, so a tracker failure
never stops or hangs a run: every call goes through ``SafeTracker``, which prints
one warning line on the first exception and then drops the tracker. wandb never
prompts (no login prompt, WANDB_SILENT), its init and finish are time-bounded,
and in offline or disabled mode it touches no network (offline files go under
<run_dir>/wandb; sync them later with `wandb sync`). trackio is optional: selecting
it without the package fails the run at its start with the pip command to install it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lib.core.errors import HarnessError
from lib.core.registry import lookup

if TYPE_CHECKING:
    from lib.core.spec import RunSpec

DEFAULT_PROJECT = "pruning-harness"
INIT_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 60.0


class Tracker(Protocol):
    """What the trainer calls; every entry of TRACKERS makes one from (spec, run dir)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Tracks nothing: the run folder's metrics.jsonl and summary.json are the record."""

    def __init__(self, spec: RunSpec | None = None, run_dir: Path | None = None) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"val": {"loss": 1}} -> {"val/loss": 1}: the flat keys trackers chart."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class WandbTracker:
    """Weights & Biases, in the RunSpec's mode: online, offline (files under run_dir) or disabled."""

    def __init__(self, spec: RunSpec, run_dir: Path) -> None:
        mode = spec.wandb_mode or "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if mode != "online":  # nothing in offline/disabled mode may reach for the network
            os.environ["WANDB_MODE"] = mode
        import wandb

        if mode == "online" and not wandb.login(prompt=False, verify=False):
            raise RuntimeError("wandb online mode needs a login: run `.venv/bin/wandb login` or set "
                               "WANDB_API_KEY, or choose CONFIG_WANDB_MODE_OFFLINE")
        local = mode != "online"
        settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, finish_timeout=FINISH_TIMEOUT_S, silent=True,
                                  console="off", disable_git=True, disable_code=True, x_disable_stats=local,
                                  x_disable_meta=local, x_disable_machine_info=local)
        self._run = wandb.init(project=spec.tracker_project or DEFAULT_PROJECT, name=spec.name, dir=str(run_dir),
                               mode=mode, config=spec.to_dict(), settings=settings, reinit="create_new")

    def log(self, record: dict[str, Any]) -> None:
        self._run.log(flatten(record), step=int(record.get("step", 0)))

    def finish(self) -> None:
        self._run.finish()


class TrackioTracker:
    """trackio, the local-first tracker (optional package; never in requirements.txt)."""

    def __init__(self, spec: RunSpec, run_dir: Path) -> None:
        import trackio

        self._trackio = trackio
        trackio.init(project=spec.tracker_project or DEFAULT_PROJECT, name=spec.name, config=spec.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        self._trackio.log(flatten(record), step=int(record.get("step", 0)))

    def finish(self) -> None:
        self._trackio.finish()


TRACKERS: dict[str, type[Tracker]] = {"none": NullTracker, "wandb": WandbTracker, "trackio": TrackioTracker}
PACKAGES = {"wandb": "wandb", "trackio": "trackio"}  # tracker -> the module it needs


class SafeTracker:
    """Wraps a tracker so that its first exception prints one warning line and disables it."""

    def __init__(self, name: str, factory: Any, spec: RunSpec | None, run_dir: Path | None) -> None:
        self.name = name
        self._inner: Tracker | None = None
        self._call(lambda: setattr(self, "_inner", factory(spec, run_dir)), "start")

    @property
    def active(self) -> bool:
        return self._inner is not None

    def log(self, record: dict[str, Any]) -> None:
        if self._inner is not None:
            self._call(lambda: self._inner.log(record), "log")

    def finish(self) -> None:
        if self._inner is not None:
            self._call(self._inner.finish, "finish")
            self._inner = None

    def _call(self, fn: Any, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # a tracker must never stop a run
            self._inner = None
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            print(f"warning: tracker {self.name} failed to {what} ({type(exc).__name__}: {first}); "
                  f"tracking is off for this run, the results folder still records everything",
                  file=sys.stderr, flush=True)


def open_tracker(spec: RunSpec, run_dir: Path, rank: int = 0) -> SafeTracker:
    """The tracker the RunSpec selects, for rank 0; every other rank gets the null tracker.

    An unknown name lists the valid ones; a selected tracker whose package is not
    installed is a HarnessError naming the pip command (the run fails at its start).
    """
    name = spec.tracker or "none"
    factory = lookup(TRACKERS, name, "tracker", "lib/train/tracking.py")
    if rank != 0:
        return SafeTracker("none", NullTracker, spec, run_dir)
    module = PACKAGES.get(name)
    if module and factory is TRACKERS.get(name) and importlib.util.find_spec(module) is None:
        extra = " (kept out of requirements.txt: it downgrades pillow)" if name == "trackio" else ""
        raise HarnessError(f"tracker {name} needs the {module} package: run `.venv/bin/pip install {module}`"
                           f"{extra}, or set CONFIG_TRACKER_NONE=y")
    return SafeTracker(name, factory, spec, run_dir)
