"""The per-layer sensitivity file: what `make sweep LAYERS=y` writes and the ``sweep`` distribution reads.

<run>/sweep/layers.json holds, for every prunable layer of the swept checkpoint, the validation metric when
that layer alone is pruned (|w|, exact count) to each sweep sparsity, and the drop from the checkpoint as the
sweep's tolerance counts it: points of accuracy, or percent of perplexity. Training reads it once, when the
config is read: the curves travel in the RunSpec (``PruneSettings.layer_curves``), so a run reruns without
the file, and the file's name and digest are recorded beside them (``layer_source``).

Refused, each in one line: a file that is not one, a file of another model (by name when the config is read;
by layer names and shapes when the pruner is built), a stale file (its checkpoint was replaced after the
sweep), and targets beyond what the measured sparsities reach.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lib.core.errors import ConfigError, HarnessError
from lib.core.files import file_sha256, write_json_atomic
from lib.pruning import distribution

KIND, VERSION = "layer-sensitivity", 1
FILE = "layers.json"
REMAKE = "make sweep RUN=<the run> LAYERS=y"


def write(folder: Path, record: dict[str, Any]) -> Path:
    """``record`` (lib/sweep/layers.py) as ``folder``/layers.json; returns the path."""
    path = folder / FILE
    write_json_atomic(path, {"kind": KIND, "version": VERSION, **record})
    return path


def read(text: str, model: str, targets: Sequence[float]) -> tuple[tuple, str]:
    """The curves of file ``text`` for ``model`` (``((name, shape, ((s, drop), ...)), ...)``) and where they
    came from; every problem a ConfigError naming CONFIG_SPARSITY_DISTRIBUTION_FILE."""
    where = f"CONFIG_SPARSITY_DISTRIBUTION_FILE={text!r}"
    if not text.strip():
        raise ConfigError(f"{where}: the sweep distribution needs a per-layer sensitivity file; write one with "
                          f"{REMAKE} and give its sweep/{FILE}")
    path = Path(text).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; write it with {REMAKE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: not readable as JSON ({type(exc).__name__}); write it again with "
                          f"{REMAKE}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("layers"), dict):
        raise ConfigError(f"{where}: not a per-layer sensitivity file (no kind {KIND!r}); give the sweep/{FILE} "
                          f"that {REMAKE} writes")
    if data.get("version") != VERSION:
        raise ConfigError(f"{where}: format version {data.get('version')!r}, this harness reads {VERSION}; "
                          f"write it again with {REMAKE}")
    if data.get("model") != model:
        raise ConfigError(f"{where}: measured on {data.get('model')!r}, but the matrix trains {model!r}; a "
                          f"distribution file applies to its own model only")
    _check_fresh(where, data)
    curves = tuple((name, tuple(layer["shape"]), tuple(zip(data["sparsities"], layer["drops"], strict=True)))
                   for name, layer in data["layers"].items())
    shapes = [shape for _, shape, _ in curves]
    highest = distribution.reachable(shapes, [curve for _, _, curve in curves])
    for target in targets:
        if target > highest + 1e-12:
            raise ConfigError(f"{where}: its layers were measured up to {100 * max(data['sparsities']):g} %, "
                              f"which reaches {100 * highest:.1f} % overall, below the target "
                              f"{100 * target:g} %; sweep again with higher SPARSITIES=")
    digest = file_sha256(path)
    source = (f"{path.resolve()} (sha256 {digest[:12]}; run {data.get('run')}, step "
              f"{data.get('checkpoint', {}).get('step')})")
    return curves, source


def _check_fresh(where: str, data: dict[str, Any]) -> None:
    """A file whose checkpoint is still there but no longer the one measured is stale."""
    recorded = data.get("checkpoint") or {}
    path = Path(recorded.get("path", ""))
    if not recorded.get("path") or not path.is_file():
        return  # moved or deleted: the curves stand on their own
    digest = file_sha256(path)
    if digest != recorded.get("sha256"):
        raise ConfigError(f"{where}: stale: {path} changed since the sweep measured it (sha256 "
                          f"{str(recorded.get('sha256'))[:12]} then, {digest[:12]} now); sweep again with {REMAKE}")


def curves_for(curves: tuple, params: list[tuple[str, nn.Parameter]]) -> list[tuple]:
    """The curves in ``params``' order, after checking the file's layers are exactly these weights."""
    measured = {name: (tuple(shape), curve) for name, shape, curve in curves}
    have = {name: tuple(p.shape) for name, p in params}
    if set(measured) != set(have) or any(measured[n][0] != have[n] for n in have):
        wrong = sorted(set(measured) ^ set(have)) or [n for n in have if measured[n][0] != have[n]]
        raise HarnessError(f"the sweep distribution's layers are not this model's (first difference: {wrong[0]}); "
                           f"was CONFIG_SPARSITY_DISTRIBUTION_FILE measured on another architecture? "
                           f"Sweep this model with {REMAKE}")
    return [measured[name][1] for name, _ in params]
