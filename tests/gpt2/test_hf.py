"""GPT-2 in and out of Hugging Face transformers (gpt2/hf.py, `make export FORMAT=hf`, `make import`).

transformers is the outside reference: the exported folder must load in GPT2LMHeadModel and
AutoModelForCausalLM offline and give the harness model's logits (float32, max difference 1e-5), with
every pruned weight still exactly zero; importing it back must give the same logits exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from gpt2 import hf
from gpt2.model import GPT, config_for
from lib import cli
from lib.checkpoint import load
from lib.checkpoint.export import export, load_export, write_hf
from lib.checkpoint.folder import RunCheckpoints
from lib.checkpoint.versions import ExportVersions
from lib.core.errors import ConfigError
from lib.core.spec import OptimSettings, PruneSettings
from lib.optim.bitmask import unpack
from tests.conftest import VOCAB, resolve_defconfig, synthetic_spec, tiny_spec, trained_run
from tests.sweep.test_baselines import sweep_baselines

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))


def hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def harness_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A dense and a magnitude-pruned tiny GPT run, trained in-process, each exported with FORMAT=hf."""
    tmp = tmp_path_factory.mktemp("hf")
    dense = synthetic_spec(tmp, name="dense", max_iters=10, eval_interval=5)
    pruned = dataclasses.replace(dense, name="pruned", prune=PruneSettings("magnitude", 0.5, start=2, end=6,
                                                                          frequency=2))
    found = {}
    for spec in (dense, pruned):
        found[spec.name] = trained_run(tmp, spec)
        export(found[spec.name], "hf")
    return found


@pytest.mark.parametrize("name", ["dense", "pruned"])
def test_an_hf_export_loads_in_transformers_with_the_same_logits(runs: dict[str, Path], name: str) -> None:
    out = ExportVersions(runs[name]).latest()
    model, _ = load_export(out)
    assert (hf_logits(out / "hf") - harness_logits(model)).abs().max() <= 1e-5
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"), local_files_only=True)
    assert type(auto).__name__ == "GPT2LMHeadModel"
    assert auto.lm_head.weight.data_ptr() == auto.transformer.wte.weight.data_ptr()  # tied, stored once
    card = json.loads((out / "model_card.json").read_text())["hf"]
    assert card["tokenizer"].startswith("none written") and card["padded_to_uniform_widths"] is None


def test_pruned_weights_stay_exactly_zero_in_the_hf_export(runs: dict[str, Path]) -> None:
    run_dir = runs["pruned"]
    best = load(RunCheckpoints(run_dir).best)
    masks = best["pruner"]["masks"]
    folder = ExportVersions(run_dir).latest() / "hf"
    auto = transformers.GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True)
    weights = dict(auto.named_parameters())
    pruned = total = 0
    for name, packed in masks.items():  # harness name h.0.attn.c_attn.weight -> transposed transformers weight
        theirs = weights[f"transformer.{name}"].detach().t()
        keep = unpack(packed, theirs.shape) if packed.dtype == torch.uint8 else packed
        assert torch.count_nonzero(theirs[~keep]) == 0, name
        pruned, total = pruned + int((~keep).sum()), total + keep.numel()
    assert pruned / total == pytest.approx(0.5, abs=0.01)  # the target: the masks were there to check


def test_a_cut_model_is_padded_to_uniform_widths_with_zeros_and_the_same_logits(tmp_path: Path) -> None:
    """Per-layer head and neuron counts (what surgery leaves) pad back to GPT2Config's uniform widths."""
    torch.manual_seed(0)
    model = GPT(config_for("tiny", VOCAB, 16, {"n_layer": 3, "heads": [4, 2, 3], "mlp": [512, 100, 300]}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases off zero: a padded head or neuron must not pick them up
    converted = hf.to_hf(model)
    notes = write_hf(converted, tmp_path / "hf")
    assert notes["padded_to_uniform_widths"] == {"heads": [4, 2, 3], "mlp": [512, 100, 300], "to_heads": 4,
                                                 "to_mlp": 512}
    assert notes["parameters_true"] == sum(p.numel() for p in model.parameters()) < notes["parameters_stored"]
    assert (hf_logits(tmp_path / "hf") - harness_logits(model)).abs().max() <= 1e-5
    qkv = converted.tensors["transformer.h.1.attn.c_attn.weight"].t()  # (3 x 128, 128): heads 2 and 3 padded
    for k in range(3):
        assert torch.count_nonzero(qkv[k * 128 + 64:(k + 1) * 128]) == 0
    assert torch.count_nonzero(converted.tensors["transformer.h.1.mlp.c_fc.weight"][:, 100:]) == 0


def test_import_round_trip_is_exact_and_a_run_starts_from_it(runs: dict[str, Path], tmp_path: Path) -> None:
    out = ExportVersions(runs["dense"]).latest()
    model, spec = load_export(out)
    cfg = config_for("tiny", VOCAB, 16)
    back = GPT(cfg)
    back.load_state_dict(hf.from_hf(out / "hf", cfg))
    assert torch.equal(harness_logits(back), harness_logits(model))
    # CONFIG_GPT2_INIT_HF: a fresh run starts from those weights (lr 0 keeps them: its best checkpoint holds them)
    start = dataclasses.replace(synthetic_spec(tmp_path, name="from_hf", max_iters=2, eval_interval=1),
                                optim=OptimSettings("adamw", 0.0, 0.0))
    start = dataclasses.replace(start, model_options={**start.model_options, "init_hf": str(out / "hf")})
    imported = trained_run(tmp_path, start)
    weights = load(RunCheckpoints(imported).best)["model"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    sweep_baselines(imported)  # Wanda and SparseGPT rows on the imported weights (issue 32)


def test_import_refuses_a_folder_that_does_not_fit_in_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    good = ExportVersions(runs["dense"]).latest() / "hf"
    cfg = config_for("tiny", VOCAB, 16)
    with pytest.raises(ConfigError, match="n_layer is 4 there but 12 in the configured GPT-2 size"):
        hf.from_hf(good, config_for("124m", 50304, 16))
    with pytest.raises(ConfigError, match="16 positions, fewer than CONFIG_GPT2_BLOCK_SIZE=32"):
        hf.from_hf(good, config_for("tiny", VOCAB, 32))
    other = tmp_path / "other"
    shutil.copytree(good, other)
    (other / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                   "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama', not 'gpt2'"):
        hf.from_hf(other, cfg)
    shutil.copy(good / "config.json", other / "config.json")
    (other / "vocab.json").write_text(json.dumps({"hello": 0}))
    with pytest.raises(ConfigError, match="vocab.json differs from the GPT-2 BPE"):
        hf.from_hf(other, cfg)
    (other / "vocab.json").unlink()
    (other / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="model.safetensors cannot be read"):
        hf.from_hf(other, cfg)
    with pytest.raises(ConfigError, match="has no config.json: not a transformers model folder"):
        hf.from_hf(tmp_path, cfg)


def test_export_and_import_bad_input_is_one_line(runs: dict[str, Path], tmp_path: Path, make_config,
                                                 capsys) -> None:
    lenet = trained_run(tmp_path, tiny_spec("lenet", max_iters=2))
    gpt2_config = make_config("CONFIG_MODEL_GPT2=y\nCONFIG_GPT2_SIZE_TINY=y\nCONFIG_GPT2_BLOCK_SIZE=16\n"
                              "CONFIG_DEVICE_CPU=y\n")
    lenet_config = resolve_defconfig("CONFIG_MODEL_LENET5=y\nCONFIG_DEVICE_CPU=y\n", tmp_path / "lenet.config")
    cases = [
        (["export", "--run", str(runs["dense"]), "--format", "onnx"],
         "FORMAT='onnx' is not an export format; choose one of harness, hf"),
        (["export", "--run", str(lenet), "--format", "hf"], "FORMAT=hf: transformers has no model class for lenet5"),
        (["import", "--config", str(gpt2_config)], "import needs a folder: `make import HF="),
        (["import", "--config", str(gpt2_config), "--hf", str(tmp_path / "nowhere")], "no such folder"),
        (["import", "--config", str(lenet_config), "--hf", str(ExportVersions(runs["dense"]).latest() / "hf")],
         "trains no GPT-2 model"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    good = str(ExportVersions(runs["dense"]).latest() / "hf")
    assert cli.main(["import", "--config", str(gpt2_config), "--hf", good]) == 0
    assert "parameters that fits .config" in capsys.readouterr().out
