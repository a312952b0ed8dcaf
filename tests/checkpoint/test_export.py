"""`make export`: safetensors with exact zeros that evaluate the same, tied GPT-2 weights, bad input in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from lib import cli
from lib.checkpoint import load
from lib.checkpoint.versions import ExportVersions, resolve
from lib.core.errors import HarnessError
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
    out = run_dir / "export" / "v1"
    for name in ("model.safetensors", "model_card.json"):  # the umask's mode, not safetensors' 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    card = json.loads((out / "model_card.json").read_text())
    assert card["version"] == {"name": "v1", "format": "harness", "options": {"format": "harness", "sparse": "dense",
                                                                              "quant": "none"}}
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
    weights = load_file(out / "model.safetensors")
    best = load(run_dir / "checkpoints" / "best.pt")
    for name, packed in best["pruner"]["masks"].items():
        from lib.optim.bitmask import unpack

        keep = packed if packed.dtype == torch.bool else unpack(packed, weights[name].shape)
        assert torch.count_nonzero(weights[name][~keep.bool()]) == 0, name  # pruned: exactly zero
    model, loaded_spec = load_export(run_dir / "export")
    with torch.no_grad():
        again = get_task("lenet5").evaluate(model.eval(), loaded_spec, "test")
    assert again["accuracy"] == summary["test_at_best"]["accuracy"] and again["loss"] == summary["test_at_best"]["loss"]
    # every `make export` is a new version: v1 is never touched again, `latest` names the newest
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["export", "--run", str(run_dir)]) == 0 and cli.main(["export", "--run", str(run_dir)]) == 0
    assert [p.name for p in ExportVersions(run_dir).versions()] == ["v1", "v2", "v3"]
    assert (run_dir / "export" / "latest").read_text() == "v3\n" and resolve(run_dir / "export").name == "v3"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_a_cut_short_export_leaves_no_version_and_latest_where_it_was(tmp_path):
    exports = ExportVersions(tmp_path)
    with exports.new() as version:
        (version.folder / "model_card.json").write_text("{}")
    with pytest.raises(RuntimeError), exports.new() as version:
        (version.folder / "model_card.json").write_text("{}")
        raise RuntimeError("killed")  # the block did not complete: no v2
    assert [p.name for p in exports.versions()] == ["v1"] and exports.latest().name == "v1"
    (exports.folder / ".v2.partial").mkdir()  # what SIGKILL in the middle leaves, half written
    (exports.folder / ".v2.partial" / "model.safetensors").write_bytes(b"half")
    with exports.new() as version:
        assert version.name == "v2" and not list(version.folder.iterdir())  # started afresh
    assert exports.latest().name == "v2" and not list(exports.folder.glob(".*"))


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


def test_a_compressed_export_restores_bit_for_bit_at_the_measured_size(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lib.checkpoint.export import export, load_export

    spec = tiny_spec("sparse90", pruning="magnitude", sparsity=0.9, max_iters=30, prune={"end": 20})
    run_dir = trained_run(tmp_path, spec)
    dense, packed = export(run_dir), export(run_dir, sparse="compressed")
    assert [p.name for p in ExportVersions(run_dir).versions()] == ["v1", "v2"]
    a, _ = load_export(dense)
    b, _ = load_export(packed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), name  # every bit, -0.0 included
    storage = json.loads((packed / "model_card.json").read_text())["storage"]
    file = packed / "model.compressed.safetensors"
    weights = sum(t.numel() for n, t in a.state_dict().items() if n.endswith("weight"))
    biases = sum(t.numel() for n, t in a.state_dict().items() if n.endswith("bias"))
    expected = (0.1 * weights * 4 + weights / 8 + biases * 4) / ((weights + biases) * 4)  # values + 1 bit + biases
    assert storage["size_ratio"] == pytest.approx(expected, abs=0.01) and storage["size_ratio"] < 0.16
    assert file.stat().st_size < 0.17 * (dense / "model.safetensors").stat().st_size  # the header is small
    # a file whose values and mask disagree is refused in one line, and nothing is loaded
    with safe_open(str(file), "pt") as handle:
        tensors, info = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118
    tensors["conv1.weight.values"] = tensors["conv1.weight.values"][:-1].clone()
    save_file(tensors, str(file), info)
    assert cli.main(["export", "--run", str(run_dir), "--sparse", "zip"]) == 2
    assert capsys.readouterr().err.strip() == "error: SPARSE='zip' is not a storage; choose one of dense, compressed"
    with pytest.raises(HarnessError, match=r"conv1.weight has \d+ values but its mask keeps \d+; the file is damaged"):
        load_export(packed)


def test_compressed_storage_keeps_negative_zero_and_tied_tensors(tmp_path):
    from lib.checkpoint import compressed

    shared = torch.tensor([[0.0, -0.0, 1.5], [0.0, 2.0, 0.0]])
    state = {"w": shared, "tied": shared, "ints": torch.tensor([0, 3, 0]), "full": torch.ones(4)}
    facts = compressed.save(state, tmp_path / "m.safetensors")
    back = compressed.load(tmp_path / "m.safetensors")
    assert facts["tensors_compressed"] == 1 and set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name].view(-1).view(torch.uint8),
                                                                  tensor.reshape(-1).view(torch.uint8)), name
    assert back["w"].reshape(-1)[1].item() == 0.0 and str(back["w"].reshape(-1)[1].item()) == "-0.0"
