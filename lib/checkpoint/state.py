"""What a training checkpoint holds, and putting it back for an exact resume.

Exactness rests on four things: every tensor of state (model, optimizer, pruner, grad
scaler) is saved bit for bit; every RNG (python, numpy, torch CPU and CUDA) is saved and
restored; the data stream is rebuilt from its seed and advanced past the micro-batches
already consumed (the task plug-in's streams are deterministic functions of their
arguments, lib/core/task.py); and the run's logs are cut back to what they held at the
checkpoint, so nothing is logged twice.
"""

from __future__ import annotations

import platform
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.checkpoint.format import CheckpointError
from lib.core.errors import first_line
from lib.core.provenance import code_state

FORMAT = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what a scheduler sends before it preempts a job
_stop = {"signal": 0}


class Stopped(Exception):
    """The run stopped on a signal after writing a checkpoint at the end of ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint was written")
        self.step = step


class SurgeryDue(Exception):
    """CONFIG_SURGERY_EVERY: a checkpoint was written at the end of ``step`` for surgery to cut
    (lib/train/run.py cuts it, then trains on from the result)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"surgery due after step {step}")
        self.step = step


def request_stop(signum: int, frame: Any = None) -> None:
    """Signal handler: finish the current step, write a checkpoint, then stop."""
    _stop["signal"] = signum


def stop_requested() -> int:
    """The signal that asked this process to stop, or 0."""
    return _stop["signal"]


def install_stop_handlers() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)


@dataclass
class Progress:
    """The training loop's own counters: everything besides tensors that a resume needs."""

    step: int = 0
    provisional: int = 0  # the step count (fixed after probing under a time budget)
    eval_every: int = 1
    evals: int = 0
    samples: int = 0
    train_time: float = 0.0
    wall_before: float = 0.0  # wall time of earlier sessions of this run
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    micro_batch: int = 0
    grad_accum: int = 0
    log_offsets: dict[str, int] = field(default_factory=dict)  # bytes of each log at the checkpoint
    resumed_from: list[int] = field(default_factory=list)  # the step of every earlier resume
    surgeries: list[dict[str, Any]] = field(default_factory=list)  # what each surgery removed (lib/surgery/cut.py)


def payload(progress: Progress, spec_dict: dict[str, Any], model: torch.nn.Module, optimizer: Any, pruner: Any,
            scaler: Any, stats: Any = None, world_size: int = 1) -> dict[str, Any]:
    """The complete state at the end of ``progress.step`` (weights_only-safe: tensors and plain data).

    ``architecture`` (a model that surgery can change describes its shape) lets the model be rebuilt
    as it is; ``statistics`` are the structure statistics (lib/surgery/stats.py) when gathered. A sharded
    (FSDP2) run's weights, optimizer state and masks are in the shards beside this file instead
    (lib/train/sharding.py); ``sharded`` says over how many ranks and which masks they hold."""
    if getattr(pruner, "sharded", False):
        state = pruner.state_dict()
        names = sorted(state.pop("masks"))
        return {**_rest(progress, spec_dict, model, pruner, scaler, stats), "pruner": {**state, "masks": {}},
                "sharded": {"world_size": world_size, "masks": names}}
    return {**_rest(progress, spec_dict, model, pruner, scaler, stats), "model": model.state_dict(),
            "optimizer": optimizer.state_dict()}


def _rest(progress: Progress, spec_dict: dict[str, Any], model: torch.nn.Module, pruner: Any, scaler: Any,
          stats: Any) -> dict[str, Any]:
    return {
        "architecture": architecture_of(model),
        "statistics": stats.state_dict() if stats is not None else None,
        "format": FORMAT,
        "step": progress.step,
        "progress": asdict(progress),
        "pruner": pruner.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "spec": spec_dict,
        "versions": versions(),
    }


def architecture_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """What ``task.build_model(spec, architecture)`` needs to rebuild ``model`` as surgery left it; None for
    a family that surgery cannot cut."""
    describe = getattr(model, "architecture", None)
    return describe() if callable(describe) else None


def restore(state: dict[str, Any], where: Path, spec_dict: dict[str, Any], model: torch.nn.Module, optimizer: Any,
            pruner: Any, scaler: Any, stats: Any = None) -> Progress:
    """Put ``state`` back into the run's objects; CheckpointError (one line) when it belongs to another run."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {where} has format {state.get('format')!r}; this harness reads {FORMAT}")
    check_spec(state.get("spec", {}), spec_dict, where)
    try:
        if "sharded" not in state:  # else the trainer loads the shards (lib/train/sharding.py)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        pruner.load_state_dict(state["pruner"])
        scaler.load_state_dict(state["scaler"])
        if stats is not None and state.get("statistics"):
            stats.load_state_dict(state["statistics"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where} does not fit this run: {first_line(exc)}") from None
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


# Fields of the RunSpec that may change between the killed run and its resume without changing the result.
MAY_DIFFER = ("name", "data_dir", "hardware", "surgery", "sweep")


def check_spec(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """The checkpoint must come from this run's spec: same model, optimizer, pruning, training and seed."""
    if saved.get("model") != current.get("model"):
        raise CheckpointError(f"checkpoint {where} is of model {saved.get('model')!r}, this run trains "
                              f"{current.get('model')!r}; it belongs to another run")
    saved = _with_defaults(saved)  # a setting added since the checkpoint was written counts at its default
    saved, current = _without_numerics_free(saved), _without_numerics_free(current)
    differ = sorted(k for k in set(saved) | set(current) if k not in MAY_DIFFER and saved.get(k) != current.get(k))
    if differ:
        key = differ[0]
        raise CheckpointError(f"checkpoint {where} was made for another RunSpec ({', '.join(differ)} differ; "
                              f"{key}: {_short(saved.get(key))} vs {_short(current.get(key))} now)")


def _without_numerics_free(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` less the settings a resume may change because the numbers do not depend on them: compact optimizer
    state (bit-identical to dense; the trainer converts the checkpoint's state, lib/optim/compact.py)."""
    optim = {k: v for k, v in (spec.get("optim") or {}).items() if k != "compact_state"}
    return {**spec, "optim": optim} if "optim" in spec else spec


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    from lib.core.spec import RunSpec

    try:
        return RunSpec.from_dict(saved).to_dict()
    except (TypeError, KeyError, ValueError):
        return saved  # compared as written: every difference shows


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict[str, str]:
    """What made the checkpoint: the commit and the library versions (lib/core/provenance.py collects them)."""
    return {"commit": code_state()["commit"] or "unknown", "torch": str(torch.__version__),
            "numpy": np.__version__, "python": platform.python_version()}
