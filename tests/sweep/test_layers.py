"""`make sweep LAYERS=y` (lib/sweep/layers.py): each layer pruned alone, checked against torch.nn.utils.prune;
its file drives the ``sweep`` distribution from the config to a trained run (issue 32)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lib import config, matrix
from lib.checkpoint import load
from lib.checkpoint.folder import RunCheckpoints
from lib.core.errors import ConfigError
from lib.core.spec import RunSpec
from lib.core.task import get_task
from lib.hardware import Devices
from lib.pruning.distribution import kept_counts
from lib.pruning.threshold import prune_count
from lib.results.report import render
from lib.sweep.oneshot import sweep_run
from tests.conftest import tiny_spec, trained_run

ASKED = {"SPARSITIES": "50,90", "METRICS": "magnitude", "PATTERNS": "unstructured", "LAYERS": "y"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = trained_run(tmp_path_factory.mktemp("layers"), tiny_spec("lenet5_adamw_none_0", max_iters=20))
    return run_dir, sweep_run(run_dir, ASKED, say=lambda _: None)


def _alone_by_torch(run_dir: Path, layer: str, target: float) -> float:
    """Val accuracy of the best weights with only ``layer`` pruned by torch's L1 pruning to ``target``."""
    from torch.nn.utils import prune

    spec = RunSpec.read(run_dir / "spec.json")
    task = get_task(spec.model)
    model = task.build_model(spec)
    model.load_state_dict(load(RunCheckpoints(run_dir).best)["model"])
    module = model.get_submodule(layer.rpartition(".")[0])
    prune.l1_unstructured(module, "weight", amount=prune_count(module.weight.numel(), target))
    prune.remove(module, "weight")
    with torch.no_grad():
        return task.evaluate(model.eval(), spec, "val")["accuracy"]


def test_each_layer_alone_is_what_torch_prune_gives_and_the_file_holds_the_drops(swept) -> None:
    run_dir, record = swept
    layers = record["layers"]
    assert list(layers) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    dense = record["dense"]["val"]["accuracy"]
    for name in ("conv1.weight", "fc1.weight"):
        assert layers[name]["values"] == [_alone_by_torch(run_dir, name, s) for s in (0.5, 0.9)], name
    written = json.loads((run_dir / "sweep" / "layers.json").read_text())
    assert written["kind"] == "layer-sensitivity" and written["model"] == "lenet5"
    assert written["checkpoint"]["sha256"] == record["checkpoint"]["sha256"]
    for layer in written["layers"].values():
        assert layer["drops"] == pytest.approx([dense - v for v in layer["values"]])
        assert layer["size"] == math.prod(layer["shape"])
    text = (run_dir / "sweep" / "sweep.md").read_text()
    fc1 = layers["fc1.weight"]
    assert f"| fc1.weight | 48,000 | {fc1['values'][0]:.2f} ({fc1['drops'][0]:+.2f}) |" in text


def test_a_run_with_the_sweep_distribution_trains_to_the_files_per_layer_targets(swept, make_config,
                                                                               tmp_path: Path) -> None:
    run_dir, _ = swept
    path = run_dir / "sweep" / "layers.json"
    lines = (f'CONFIG_MODEL_LENET5=y\nCONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="0.8"\n'
             f'CONFIG_SPARSITY_DISTRIBUTION_FILE="{path}"\nCONFIG_SPARSITY_DISTRIBUTION_SWEEP=y\n')
    planned = matrix.expand(config.load(make_config(lines)), Devices("cpu", cpu_cores=2))[0]
    assert planned.prune.distribution == "sweep" and str(path) in planned.prune.layer_source
    tiny = tiny_spec("swept", pruning="magnitude", sparsity=0.8, max_iters=12)
    keep = {k: getattr(planned.prune, k) for k in ("distribution", "layer_curves", "layer_source")}
    done = trained_run(tmp_path, dataclasses.replace(tiny, prune=dataclasses.replace(tiny.prune, **keep)))
    assert RunSpec.read(done / "spec.json").prune == dataclasses.replace(tiny.prune, **keep)  # through spec.json
    summary = json.loads((done / "summary.json").read_text())
    assert summary["sparsity"]["reached"] == prune_count(61470, 0.8) / 61470 and not summary["flags"]
    shapes = [shape for _, shape, _ in planned.prune.layer_curves]
    kept = kept_counts("sweep", shapes, 0.8, [curve for _, _, curve in planned.prune.layer_curves])
    reported = summary["sparsity"]["layers"]
    assert [round(e["reached"] * math.prod(s)) for e, s in zip(reported.values(), shapes, strict=True)] == [
        math.prod(s) - k for s, k in zip(shapes, kept, strict=True)]
    assert len({round(e["target"], 3) for e in reported.values()}) > 1  # not uniform: the curves decided
    assert summary["sparsity"]["source"] == planned.prune.layer_source
    fc1 = reported["fc1.weight"]
    report = render(done.parent)  # report.md: a column per run, target / reached per layer
    assert "### Per-layer sparsity (target / reached, %)" in report and "| layer | swept (sweep) |" in report
    assert f"| fc1.weight | {100 * fc1['target']:.1f} / {100 * fc1['reached']:.1f} |" in report


def test_a_sweep_distribution_file_of_another_model_or_bad_layers_value_is_one_line(swept, make_config) -> None:
    run_dir, _ = swept
    lines = ('CONFIG_MODEL_GPT2=y\nCONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="0.5"\n'
             f'CONFIG_SPARSITY_DISTRIBUTION_FILE="{run_dir / "sweep" / "layers.json"}"\n'
             'CONFIG_SPARSITY_DISTRIBUTION_SWEEP=y\n')
    with pytest.raises(ConfigError, match="measured on 'lenet5', but the matrix trains 'gpt2'"):
        config.load(make_config(lines))
    with pytest.raises(ConfigError, match="^LAYERS='yes': give y or n$"):
        sweep_run(run_dir, {**ASKED, "LAYERS": "yes"}, say=lambda _: None)
