"""The ``sweep`` distribution (lib/pruning/distribution.py) and its file (lib/pruning/sensitivity.py): the
equal-drop rule worked by hand, the overall count exact, and every bad file one line (issue 32)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from lenet5.model import LeNet5
from lib.core.errors import ConfigError, HarnessError
from lib.core.spec import PruneSettings
from lib.pruning import build_pruner, prunable_parameters, sensitivity
from lib.pruning.distribution import kept_counts, sweep_densities
from lib.pruning.threshold import prune_count


def test_each_layer_is_pruned_until_its_drop_reaches_one_common_level() -> None:
    """Two layers of 100 weights, target 50 %. A loses nothing up to 50 % and 10 points at 90 %; B loses 5 points
    at 50 %. At level t: s_A = 0.5 + 0.4 t / 10 and s_B = 0.5 t / 5, and s_A + s_B = 1 gives t = 0.5 / 0.14."""
    curves = [((0.5, 0.0), (0.9, 10.0)), ((0.5, 5.0), (0.9, 20.0))]
    tau = 0.5 / 0.14
    densities = sweep_densities([(10, 10), (10, 10)], curves, 0.5)
    assert densities == pytest.approx([1 - (0.5 + 0.04 * tau), 1 - 0.1 * tau], abs=1e-9)
    assert densities[0] < densities[1]  # the less sensitive layer is pruned harder
    assert sum(kept_counts("sweep", [(10, 10), (10, 10)], 0.5, curves)) == 100  # exactly 100 of 200 kept
    # Below what the free layer holds, only it is pruned; a drop that falls again (noise) is reached only past the
    # larger one, so B's 90 % point (drop 3 < 5) does not make it cheap.
    assert sweep_densities([(100,), (100,)], curves, 0.2) == pytest.approx([0.6, 1.0])
    noisy = [((0.5, 0.0), (0.9, 10.0)), ((0.5, 5.0), (0.9, 3.0))]
    assert sweep_densities([(100,), (100,)], noisy, 0.5) == sweep_densities([(100,), (100,)],
                                                                             [curves[0], ((0.5, 5.0), (0.9, 5.0))],
                                                                             0.5)
    with pytest.raises(ValueError, match="beyond"):
        sweep_densities([(100,), (100,)], curves, 0.95)  # neither layer was measured past 90 %


def _curves_of(model: torch.nn.Module) -> tuple:
    """Made-up curves for every prunable layer of ``model``: larger layers less sensitive."""
    return tuple((name, tuple(p.shape), ((0.5, 100.0 / p.numel() ** 0.5), (0.99, 1e4 / p.numel() ** 0.5)))
                 for name, p in prunable_parameters(model))


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.97])
def test_a_sweep_distribution_prunes_exactly_the_overall_count_per_layer_as_computed(sparsity: float) -> None:
    torch.manual_seed(0)
    model = LeNet5(num_classes=10)
    curves = _curves_of(model)
    pruner = build_pruner(model, None, PruneSettings(method="magnitude", target=0.97, distribution="sweep",
                                                     layer_curves=curves))
    pruner.prune_to(sparsity)
    shapes = [shape for _, shape, _ in curves]
    zeros = [int((p == 0).sum()) for _, p in pruner.params]
    assert sum(zeros) == prune_count(61470, sparsity)
    assert zeros == [math.prod(s) - k for s, k in zip(shapes, kept_counts("sweep", shapes, sparsity,
                                                                            [c for _, _, c in curves]), strict=True)]
    assert zeros[2] / 48000 > zeros[0] / 150  # fc1 (largest, least sensitive here) pruned harder than conv1


def test_curves_of_another_architecture_are_one_line_when_the_pruner_is_built() -> None:
    curves = _curves_of(LeNet5(num_classes=10))
    wrong = ((curves[0][0], (3, 1, 5, 5), curves[0][2]), *curves[1:])
    for bad in (wrong, curves[:-1]):
        with pytest.raises(HarnessError, match="not this model's .* measured on another architecture"):
            build_pruner(LeNet5(num_classes=10), None, PruneSettings(method="magnitude", target=0.5,
                                                                      distribution="sweep", layer_curves=bad))


def _file(folder: Path, **changes: object) -> Path:
    model = LeNet5(num_classes=10)
    checkpoint = folder / "best.pt"
    checkpoint.write_bytes(b"weights")
    layers = {name: {"shape": list(shape), "size": math.prod(shape), "sparsity": 0.0, "values": [98.0, 90.0],
                     "drops": [d for _, d in curve]} for name, shape, curve in _curves_of(model)}
    record = {"run": "r", "model": "lenet5", "sparsities": [0.5, 0.99], "layers": layers, "metric": "accuracy",
              "checkpoint": {"path": str(checkpoint), "sha256": hashlib.sha256(b"weights").hexdigest(),
                             "step": 20}}
    path = sensitivity.write(folder, record)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_a_good_file_gives_the_curves_and_names_its_source(tmp_path: Path) -> None:
    path = _file(tmp_path)
    curves, source = sensitivity.read(str(path), "lenet5", [0.5, 0.9])
    assert curves == _curves_of(LeNet5(num_classes=10))
    assert str(path.resolve()) in source and "run r, step 20" in source


@pytest.mark.parametrize("change, message", [
    ({"model": "gpt2"}, "measured on 'gpt2', but the matrix trains 'lenet5'"),
    ({"kind": "sweep"}, "not a per-layer sensitivity file"),
    ({"version": 0}, "format version 0"),
    ({"sparsities": [0.3, 0.5]}, "measured up to 50 %, which reaches 50.0 % overall, below the target 90 %"),
])
def test_a_bad_file_is_one_line(tmp_path: Path, change: dict, message: str) -> None:
    path = _file(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        sensitivity.read(str(path), "lenet5", [0.5, 0.9])


def test_a_missing_unreadable_or_stale_file_is_one_line(tmp_path: Path) -> None:
    for text, message in (("", "needs a per-layer sensitivity file"), (str(tmp_path / "none.json"), "no such file")):
        with pytest.raises(ConfigError, match=message):
            sensitivity.read(text, "lenet5", [0.5])
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ConfigError, match="not readable as JSON"):
        sensitivity.read(str(tmp_path / "junk.json"), "lenet5", [0.5])
    path = _file(tmp_path)
    (tmp_path / "best.pt").write_bytes(b"trained on")  # the run went on: its best checkpoint is another now
    with pytest.raises(ConfigError, match="stale: .*best.pt changed since the sweep measured it"):
        sensitivity.read(str(path), "lenet5", [0.5])
    (tmp_path / "best.pt").unlink()  # gone: the curves stand on their own
    assert sensitivity.read(str(path), "lenet5", [0.5])[0]
