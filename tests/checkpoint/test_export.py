"""`make export`: safetensors with exact zeros that evaluate the same, tied GPT-2 weights, bad input in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from lib.checkpoint import load
from lib.core.task import get_task
from tests.conftest import tiny_spec, trained_run


def test_export_is_safetensors_with_exact_zeros_and_evaluates_the_same(tmp_path):
    from safetensors.torch import load_file

    from lib import cli
    from lib.checkpoint.export import load_export
    from lib.core.task import get_task
    from lib.train import run as run_mod

    spec = tiny_spec("pruned", pruning="magnitude", sparsity=0.7, max_iters=30, prune={"end": 20})
    run_dir = tmp_path / "pruned"
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert run_mod.run(run_dir) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert cli.main(["export", "--run", str(run_dir)]) == 0
    for name in ("model.safetensors", "model_card.json"):  # the umask's mode, not safetensors' 0600
        assert (run_dir / "export" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    card = json.loads((run_dir / "export" / "model_card.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card["structure"]["reduction"] == 0 and card["structure"]["parameters_now"] == 61706  # nothing cut
    assert card["provenance"]["data"] == summary["provenance"]["data"]  # the split's hash travels with the model
    assert "zero-padded by 2 pixels" in card["usage"]["input"] and "max-pool" in card["usage"]["forward"]
    assert card["checkpoint_step"] == summary["best"]["step"] and card["test_at_checkpoint"] == summary["test_at_best"]
    assert card["made_by"]["commit"] and card["sparsity"]["prunable_reached"] == summary["sparsity"]["reached"]
    weights = [n for n in card["shapes"] if n.endswith("weight")]  # LeNet-5's prunable tensors: every weight
    numel = {n: math.prod(card["shapes"][n]) for n in weights}
    pruned = sum(card["sparsity"]["per_layer"][n] * numel[n] for n in weights) / sum(numel.values())
    assert abs(pruned - 0.7) < 0.005, pruned  # one global threshold: layers differ, the whole is at target
    weights = load_file(run_dir / "export" / "model.safetensors")
    best = load(run_dir / "checkpoints" / "best.pt")
    for name, packed in best["pruner"]["masks"].items():
        from lib.optim.bitmask import unpack

        keep = packed if packed.dtype == torch.bool else unpack(packed, weights[name].shape)
        assert torch.count_nonzero(weights[name][~keep.bool()]) == 0, name  # pruned: exactly zero
    model, loaded_spec = load_export(run_dir / "export")
    with torch.no_grad():
        again = get_task("lenet5").evaluate(model.eval(), loaded_spec, "test")
    assert again["accuracy"] == summary["test_at_best"]["accuracy"] and again["loss"] == summary["test_at_best"]["loss"]


def test_tied_gpt2_weights_survive_an_export_round_trip(tmp_path):
    """Through the harness's own export (`make export`) and loader: a short tiny-GPT run, pruned."""
    from safetensors import safe_open

    from lib.checkpoint.export import export, load_export
    from tests.conftest import VOCAB, synthetic_spec

    spec = synthetic_spec(tmp_path, max_iters=12, eval_interval=6)
    spec = dataclasses.replace(spec, prune=dataclasses.replace(spec.prune, method="magnitude", target=0.5, start=2,
                                                               end=8, frequency=2))
    run_dir = trained_run(tmp_path, spec)
    out = export(run_dir)
    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        names = set(stored.keys())
    assert len({"wte.weight", "lm_head.weight"} & names) == 1  # the shared table is stored once
    model, _ = load_export(out)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()  # and tied again on loading
    best = load(run_dir / "checkpoints" / "best.pt")["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best[name]), name
    assert any(float((p == 0).float().mean()) > 0.4 for p in model.parameters())  # the pruned model, not a fresh one
    idx = torch.randint(0, VOCAB, (2, 16))
    trained = get_task("gpt2").build_model(spec)
    trained.load_state_dict(best)
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), trained.eval()(idx))


@pytest.mark.parametrize("setup, message", [
    ("no_best", "has no best checkpoint"),
    ("not_a_run", "not a run folder (no spec.json)"),
    ("no_run", "export needs a run folder"),
])
def test_export_bad_input_is_one_line(tmp_path, capsys, setup, message):
    from lib import cli

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    if setup == "no_best":
        tiny_spec("r").write(run_dir / "spec.json")
        (run_dir / "summary.json").write_text(json.dumps({"status": "ok"}))
    argv = ["export"] + ([] if setup == "no_run" else ["--run", str(run_dir)])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
