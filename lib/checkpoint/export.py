"""`make export RUN=<run dir> [FORMAT=hf]`: the best checkpoint's weights as safetensors, with a JSON model card,
as a new version of the run's exports (lib/checkpoint/versions.py: export/v<N>/, never overwritten, `latest`).

    <run dir>/export/v<N>/model.safetensors   the weights (pruned ones exactly zero), no pickle; with
                                              SPARSE=compressed model.compressed.safetensors instead: the
                                              kept values and a bit-packed mask (compressed.py)
    <run dir>/export/v<N>/model_card.json     model, shapes, sparsity per layer and overall, the metric at that
                                              checkpoint (val and test), dataset, command, .config, commit, the
                                              version with the format and options it was made with
    <run dir>/export/v<N>/hf/                 FORMAT=hf: a folder transformers loads (config.json,
                                              model.safetensors, the tokenizer), from the family's ``to_hf``

safetensors holds tensors only, so loading an export can never run code. Tied weights
(GPT-2's head and embedding) are stored once (safetensors.torch.save_model) and tied
again by load_export(), which builds the model from the run's spec.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lib.checkpoint import compressed
from lib.checkpoint.folder import RunCheckpoints
from lib.checkpoint.format import CheckpointError, load
from lib.checkpoint.state import architecture_of, versions
from lib.checkpoint.versions import ExportVersions, resolve
from lib.core.errors import HarnessError
from lib.core.files import write_atomic, write_json_atomic
from lib.core.spec import RunSpec
from lib.core.task import get_task
from lib.optim.bitmask import unpack
from lib.quant import check_quant, int8_state, load_int8_state, quantize_int8

FORMATS = ("harness", "hf")  # the harness's own (loaded back by load_export); transformers' (GPT-2)
STORAGE = ("dense", "compressed")  # every entry stored; kept values + bit-packed mask (compressed.py)
DENSE, COMPRESSED = "model.safetensors", "model.compressed.safetensors"


def export(run_dir: Path, fmt: str = "harness", sparse: str = "dense", quant: str = "none", say: Any = print) -> Path:
    """Write a new export version of ``run_dir``'s best checkpoint (with hf/ for FORMAT=hf, int8 Linear weights
    for QUANT=int8); return its folder."""
    check_quant(quant)
    if quant == "int8" and fmt == "hf":
        raise HarnessError("QUANT=int8 with FORMAT=hf: the transformers folder holds float weights; export "
                           "QUANT=int8 in the harness format (FORMAT=harness), which load_export reads")
    if fmt not in FORMATS:
        raise HarnessError(f"FORMAT={fmt!r} is not an export format; choose one of {', '.join(FORMATS)}")
    if sparse not in STORAGE:
        raise HarnessError(f"SPARSE={sparse!r} is not a storage; choose one of {', '.join(STORAGE)}")
    run_dir = Path(run_dir)
    spec = RunSpec.read(run_dir / "spec.json")
    task = get_task(spec.model)
    if fmt == "hf" and not hasattr(task, "to_hf"):
        raise HarnessError(f"FORMAT=hf: transformers has no model class for {spec.model}; `make export "
                           f"RUN={run_dir}` (FORMAT=harness) writes safetensors that load_export reads")
    summary = _summary(run_dir)
    best = RunCheckpoints(run_dir).require_best("export")
    state = _load_best(best)
    model = _build(spec, state.get("architecture"))
    model.load_state_dict(state["model"])
    layers = _check_zeros(model, state.get("pruner", {}).get("masks", {}), best)
    card = _card(run_dir, spec, summary, state["step"], model, layers)
    tensors = None
    if quant == "int8":  # the float model's quality beside the int8 one's, on the same splits
        card["quant"], model = int8_quality(task, spec, model, say)
        tensors = int8_state(model)
    nm = (spec.prune.nm_n, spec.prune.nm_m) if spec.prune.method == "nm" else None
    exports = ExportVersions(run_dir)
    with exports.new() as version:
        out = version.folder
        card["version"] = {"name": version.name, "format": fmt,
                           "options": {"format": fmt, "sparse": sparse, "quant": quant}}
        if sparse == "compressed":
            card["storage"] = compressed.save(tensors or model.state_dict(), out / COMPRESSED, {"run": spec.name}, nm)
            if quant == "int8":  # the ratio above is to int8 stored densely; this one to the float32 model
                stored = card["storage"]["bytes_stored"]
                card["storage"]["size_ratio_to_float32"] = stored / card["quant"]["bytes_float32"]
        elif tensors is not None:
            write_atomic(out / DENSE, lambda tmp: save_file(tensors, str(tmp), {"run": spec.name, "quant": quant}))
        else:
            write_atomic(out / DENSE, lambda tmp: save_model(model, str(tmp), {"run": spec.name}))
        if fmt == "hf":
            card["hf"] = write_hf(task.to_hf(model, spec), out / "hf")
        write_json_atomic(out / "model_card.json", card)
    return exports.folder / version.name


def write_hf(hf: Any, folder: Path) -> dict[str, Any]:
    """A transformers folder from a family's ``to_hf`` result (config, tensors by transformers' names, extra
    files, notes); returns the notes for the model card."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "model.safetensors", lambda tmp: save_file(hf.tensors, str(tmp), {"format": "pt"}))
    write_json_atomic(folder / "config.json", hf.config)
    for name, data in hf.files.items():
        write_atomic(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return {"folder": "hf", **hf.notes, "files": sorted(["config.json", "model.safetensors", *hf.files])}


def load_export(folder: Path) -> tuple[torch.nn.Module, RunSpec]:
    """The exported model, built from the card's spec and loaded from the safetensors file; ``folder`` is a
    version, or export/ (its latest version)."""
    folder = resolve(folder)
    card = json.loads((Path(folder) / "model_card.json").read_text())
    spec = RunSpec.from_dict(card["spec"])
    model = _build(spec, card.get("architecture"))
    quant = ((card.get("version") or {}).get("options") or {}).get("quant", "none")
    if (Path(folder) / COMPRESSED).is_file():
        weights = compressed.load(Path(folder) / COMPRESSED)
    elif quant == "int8":
        weights = load_file(str(Path(folder) / DENSE))
    else:
        missing, unexpected = load_model(model, str(Path(folder) / DENSE))
        weights = None
    if quant == "int8":
        return load_int8_state(model, weights).eval(), spec
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise HarnessError(f"{folder}: the export does not fit {spec.model} (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model, spec


def int8_quality(task: Any, spec: RunSpec, model: torch.nn.Module, say: Any = print) -> tuple[dict, torch.nn.Module]:
    """Quantize a copy of ``model`` to int8 (lib/quant) and evaluate both on the val and test splits; return
    the card's facts and the int8 model. Nothing is selected here, so reading the test split is fair."""
    task.prepare(spec)
    model.eval()
    before = {split: task.evaluate(model, spec, split) for split in ("val", "test")}
    int8 = copy.deepcopy(model)
    facts = quantize_int8(int8, spec.model)
    after = {split: task.evaluate(int8, spec, split) for split in ("val", "test")}
    name = task.metric.name
    facts["quality"] = {split: {"float32": before[split][name], "int8": after[split][name],
                                "delta": after[split][name] - before[split][name]} for split in before}
    facts["metric"] = name
    unique = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # a tied tensor once
    facts["bytes_float32"] = sum(t.numel() * t.element_size() for t in unique)
    say(f"export: int8 {name} val {after['val'][name]:.4f} (float32 {before['val'][name]:.4f}), test "
        f"{after['test'][name]:.4f} (float32 {before['test'][name]:.4f}); {facts['zeros_kept']:,} pruned weights "
        f"of {len(facts['quantized'])} Linear layer(s) still zero")
    return facts, int8


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        raise HarnessError(f"{run_dir} has no readable summary.json; finish the run first (`make continue`)") from None


def _load_best(path: Path) -> dict[str, Any]:
    state = load(path)  # verified: SHA-256 and weights_only
    if "model" not in state:
        raise CheckpointError(f"{path} is not a best checkpoint of this harness (no model state)")
    return state


@torch.no_grad()
def _check_zeros(model: torch.nn.Module, masks: dict[str, torch.Tensor], where: Path) -> dict[str, float]:
    """Sparsity of every weight; every pruned position must be exactly zero (refused otherwise)."""
    params = dict(model.named_parameters())
    layers = {}
    for name, param in params.items():
        if name in masks:
            mask = masks[name]
            keep = mask if mask.dtype == torch.bool else unpack(mask, param.shape)
            if torch.count_nonzero(param[~keep.bool()]):
                raise CheckpointError(f"{where}: weights of {name} that its mask prunes are not zero; not exported")
        layers[name] = float((param == 0).sum()) / param.numel()
    return layers


def _build(spec: RunSpec, architecture: dict | None) -> torch.nn.Module:
    """The model of ``spec``, as surgery left it when ``architecture`` says so."""
    return get_task(spec.model).build_model(spec, architecture)


def _card(run_dir: Path, spec: RunSpec, summary: dict[str, Any], step: int, model: torch.nn.Module,
          layers: dict[str, float]) -> dict[str, Any]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    zeros = sum(layers[n] * params[n].numel() for n in params)
    with torch.device("meta"):  # the model as built before any cut: what surgery removed, beside the zeros
        uncut = sum(p.numel() for p in _build(spec, None).parameters())
    task = get_task(spec.model)
    matrix = _read_json(run_dir.parent / "matrix.json")
    config = run_dir.parent / "config.txt"
    return {
        "run": spec.name,
        "model": spec.model,
        "model_options": spec.model_options,
        "shapes": {name: list(p.shape) for name, p in params.items()},
        "architecture": architecture_of(model),  # after checkpoint-time surgery: what build_model rebuilds
        "parameters": total,
        "structure": {"parameters_as_built": uncut, "parameters_now": total, "removed_by_surgery": uncut - total,
                      "reduction": 1 - total / uncut},
        "sparsity": {"overall": zeros / total, "prunable_target": spec.sparsity,
                     "prunable_reached": summary.get("sparsity", {}).get("reached"), "per_layer": layers},
        "checkpoint_step": step,
        "metric": summary.get("metric"),
        "val_at_checkpoint": (summary.get("best") or {}).get("val"),
        "test_at_checkpoint": summary.get("test_at_best"),
        "dataset": spec.model_options.get("dataset", spec.model),
        "command": matrix.get("command"),
        "config": config.read_text() if config.is_file() else None,
        "made_by": versions(),
        "provenance": summary.get("provenance"),  # commit, software, device, the data's SHA-256
        "usage": task.usage(spec) if hasattr(task, "usage") else None,  # preprocessing, forward, tokenizer
        "spec": spec.to_dict(),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
