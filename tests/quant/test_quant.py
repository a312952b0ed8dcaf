"""int8 after pruning (lib/quant through `make export QUANT=int8`), N:M compressed storage, and
quantization-aware training (CONFIG_QUANT_AWARE).

Runs are trained once per module: a 90 %-pruned LeNet-5, a 90 %-pruned tiny GPT, a 2:4 LeNet-5, and the
LeNet-5 with quantization-aware training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lib import cli, quant
from lib.checkpoint.export import export, load_export
from lib.checkpoint.folder import RunCheckpoints
from lib.checkpoint.format import load
from lib.checkpoint.versions import ExportVersions
from lib.core.errors import ConfigError, HarnessError
from lib.core.spec import RunSpec
from lib.core.task import get_task
from tests.conftest import synthetic_spec, tiny_spec, trained_run

PRUNE = {"end": 10}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("quant")
    gpt = synthetic_spec(tmp, name="gpt90", max_iters=10, eval_interval=5)
    gpt = dataclasses.replace(gpt, prune=dataclasses.replace(gpt.prune, method="magnitude", target=0.9, start=2,
                                                             end=6, frequency=2))
    return {"lenet90": trained_run(tmp, tiny_spec("lenet90", pruning="magnitude", sparsity=0.9, prune=PRUNE)),
            "gpt90": trained_run(tmp, gpt),
            "lenet24": trained_run(tmp, tiny_spec("lenet24", pruning="nm", sparsity=0.5, prune=PRUNE)),
            "qat": trained_run(tmp, tiny_spec("qat", pruning="magnitude", sparsity=0.9, prune=PRUNE,
                                              quant_aware=True))}


def storage_ratio(card: dict) -> float:
    return card["storage"]["size_ratio_to_float32"]


def _best_model(run_dir: Path) -> nn.Module:
    state = load(RunCheckpoints(run_dir).require_best("test"))
    spec = RunSpec.read(run_dir / "spec.json")
    model = get_task(spec.model).build_model(spec)
    model.load_state_dict(state["model"])
    return model.eval()


@pytest.mark.parametrize("name", ["lenet90", "gpt90"])
def test_an_int8_export_keeps_every_zero_and_measures_its_quality(runs, name):
    run_dir = runs[name]
    out = export(run_dir, quant="int8", sparse="compressed")
    card = json.loads((out / "model_card.json").read_text())
    facts, float_model = card["quant"], _best_model(run_dir)
    model, spec = load_export(out)
    tied = {f"{n}.weight" for n in quant.tied_linears(float_model)}
    linears = {f"{n}.weight" for n in quant.linear_names(float_model)} - tied
    assert set(facts["quantized"]) == linears and card["version"]["options"]["quant"] == "int8"
    assert set(facts["tied_float32"]) == tied and (tied == {"lm_head.weight"}) == (name == "gpt90")
    if tied:  # GPT-2's head stays float32 and tied to the embedding: the table is stored once
        assert model.lm_head.weight is model.wte.weight
        assert storage_ratio(card) < 1.0
    params = dict(model.named_parameters())
    pruned = 0
    for weight_name, weight in float_model.state_dict().items():
        if weight_name in linears:
            qdata = params[weight_name].qdata
            assert qdata.dtype == torch.int8 and not qdata[weight == 0].any(), weight_name  # zeros stay zeros
            pruned += int((weight == 0).sum())
        elif weight_name.endswith("weight") and weight.dim() > 1 and name == "lenet90":
            assert weight_name in facts["float32"]  # the convolutions, listed
    assert facts["zeros_kept"] == pruned > 0.8 * sum(float_model.get_submodule(n[:-7]).weight.numel() for n in linears)
    # the card's int8 quality is the loaded model's, beside the float32 one's
    task = get_task(spec.model)
    metric = task.metric.name
    assert task.evaluate(model, spec, "val")[metric] == pytest.approx(facts["quality"]["val"]["int8"], rel=1e-6)
    assert facts["quality"]["val"]["float32"] == pytest.approx(task.evaluate(float_model, spec, "val")[metric])
    assert facts["quality"]["val"]["delta"] == pytest.approx(facts["quality"]["val"]["int8"]
                                                             - facts["quality"]["val"]["float32"])
    assert "test" in facts["quality"]
    # int8 values + a 1-bit mask: a 90 %-sparse LeNet-5 in under a tenth of its float32 bytes
    storage = card["storage"]
    assert storage["size_ratio_to_float32"] < 0.6 * storage["size_ratio"] and storage["size_ratio"] < 0.5
    assert name != "lenet90" or storage["size_ratio_to_float32"] < 0.1


def test_n_m_exports_store_two_bit_indices_and_restore_bit_for_bit(runs):
    from safetensors import safe_open

    run_dir = runs["lenet24"]
    dense, packed = export(run_dir), export(run_dir, sparse="compressed")
    file = packed / "model.compressed.safetensors"
    with safe_open(str(file), "pt") as handle:
        names = set(handle.keys())  # noqa: SIM118 (not a dict)
        layouts = json.loads(handle.metadata()["compressed"])
    nm = [n for n, facts in layouts.items() if facts.get("layout") == "nm"]
    assert "fc1.weight" in nm and "fc1.weight.index" in names and "fc1.weight.mask" not in names
    a, _ = load_export(dense)
    b, _ = load_export(packed)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), n
    fc1 = a.fc1.weight
    values = fc1.numel() // 2  # 2 of every 4
    with safe_open(str(file), "pt") as handle:
        assert handle.get_tensor("fc1.weight.values").numel() == values
        assert handle.get_tensor("fc1.weight.index").numel() == values * 2 // 8  # 2 bits per kept value
        tensors, info = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118
    from safetensors.torch import save_file

    tensors["fc1.weight.index"] = tensors["fc1.weight.index"][:-1].clone()
    save_file(tensors, str(file), info)
    with pytest.raises(HarnessError, match="fc1.weight has .* values or an index that is not .* the file is damaged"):
        load_export(packed)
    assert [v.name for v in ExportVersions(run_dir).versions()] == ["v1", "v2"]


def test_quantization_aware_training_trains_the_int8_model(runs):
    """The fake-quantized forward rounds onto the export's int8 grid: the run's own best val is the int8
    export's val, and training with it differs from training without it."""
    run_dir = runs["qat"]
    summary = json.loads((run_dir / "summary.json").read_text())
    out = export(run_dir, quant="int8")
    facts = json.loads((out / "model_card.json").read_text())["quant"]
    assert facts["quality"]["val"]["int8"] == pytest.approx(summary["best"]["val"]["accuracy"], abs=1e-9)
    plain = _best_model(runs["lenet90"]).state_dict()
    aware = _best_model(run_dir).state_dict()
    assert not torch.equal(plain["fc1.weight"], aware["fc1.weight"])  # the same seed and steps, another method
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["train"]["quant_aware"] is True


def test_quantization_bad_input_is_one_line(runs, capsys, monkeypatch):
    cases = [(["export", "--run", str(runs["lenet90"]), "--quant", "int4"],
              "QUANT='int4' is not a quantization; choose one of none, int8"),
             (["export", "--run", str(runs["gpt90"]), "--quant", "int8", "--format", "hf"],
              "QUANT=int8 with FORMAT=hf: the transformers folder holds float weights"),
             (["sweep", "--run", str(runs["lenet90"]), "--quant", "int16"],
              "QUANT='int16' is not a quantization; choose one of none, int8")]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(HarnessError, match="has no Linear layer, and torchao's int8 weight-only quantization covers"):
        quant.quantize_int8(convs, "convs")
    with pytest.raises(ConfigError, match="CONFIG_QUANT_AWARE: Sequential has no Linear layer to fake-quantize"):
        quant.prepare_quant_aware(convs)

    def unsupported(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise NotImplementedError("no fake quantization kernel here")

    monkeypatch.setattr("torchao.quantization.quantize_", unsupported)
    with pytest.raises(ConfigError, match=r"does not run on cpu in this precision \(no fake quantization kernel"):
        quant.check_quant_aware(torch.device("cpu"), lambda: torch.autocast("cpu", dtype=torch.bfloat16))


def test_the_int8_table_reads_every_runs_newest_int8_card(runs):
    """scripts/quant_table.py, the docs' table: one row per model and method, from the model cards."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from quant_table import rows

    export(runs["qat"], quant="int8")
    skipped: list[str] = []
    table = rows([runs["qat"].parent], say=skipped.append)
    aware = json.loads((ExportVersions(runs["qat"]).versions()[-1] / "model_card.json").read_text())["quant"]
    value = aware["quality"]["val"]["int8"]
    assert any(line.startswith(f"| lenet5 | yes | 90 % | 1 | {aware['quality']['val']['float32']:.3f} | "
                               f"{value:.3f} |") for line in table), table
    assert any(line.startswith("| lenet5 | no | 90 % | 1 |") for line in table)
    assert any(line.startswith("| gpt2 | no | 90 % | 1 |") for line in table)
    assert len(skipped) == 1 and "lenet24: no QUANT=int8 export" in skipped[0]  # 2:4: no int8 export made


def test_an_int8_file_that_does_not_fit_or_a_zero_that_moved_is_one_line(runs, monkeypatch):
    """The loader refuses an int8 export whose tensors do not fit the model, and the export refuses a
    quantization that moved a pruned weight off zero (symmetric int8 cannot; a broken quantizer could)."""
    from safetensors.torch import load_file, save_file

    out = export(runs["lenet90"], quant="int8")
    file = out / "model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "fc1.weight.qdata": tensors["fc1.weight.qdata"][:, :-1].contiguous()}, str(file))
    with pytest.raises(HarnessError, match=r"int8 export's fc1.weight \(120, 399\) does not fit the model") as caught:
        load_export(out)
    assert "\n" not in str(caught.value)
    save_file({k: v for k, v in tensors.items() if k != "fc2.bias"}, str(file))
    with pytest.raises(HarnessError, match=r"does not fit the model \(missing \['fc2.bias'\]"):
        load_export(out)
    model = _best_model(runs["lenet90"])
    before = {"fc1.weight": model.fc1.weight.detach().clone()}
    quant.quantize_int8(model)
    model.fc1.weight.qdata.add_(1)  # every entry, the pruned ones included
    with pytest.raises(HarnessError, match="fc1.weight has pruned weights that are not zero after quantization"):
        quant.check_zeros(model, before)
