"""GPT-2 family: parameter counts, causal forward, pruning surface, offline tokenizer, defconfigs, a real run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken.load
import torch

from gpt2 import tokenizer
from gpt2.model import GPT, PADDED_VOCAB, SIZES, config_for, parameter_count
from gpt2.task import TASK, Options
from lib import config, matrix
from lib.core.errors import ConfigError
from lib.core.spec import HardwarePlan, OptimSettings, PruneSettings, RunSpec, TrainSettings
from lib.pruning import prunable_parameters
from lib.train import run as run_mod
from tests.conftest import ROOT, VOCAB, resolve_defconfig, synthetic_spec

# Published GPT-2 sizes: 50,257-token vocabulary, 1,024 positions, tied embedding/head counted once.
PUBLISHED = {"124m": 124_439_808, "350m": 354_823_168, "774m": 774_030_080, "1558m": 1_557_611_200}
# The same models with the vocabulary padded to 50,304 rows (what the harness trains by default).
PADDED = {"124m": 124_475_904, "350m": 354_871_296, "774m": 774_090_240, "1558m": 1_557_686_400}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_parameter_counts_match_gpt2_without_allocating(size: str) -> None:
    for vocab, expected in ((50257, PUBLISHED[size]), (PADDED_VOCAB, PADDED[size])):
        cfg = config_for(size, vocab, 1024)
        with torch.device("meta"):  # shapes only: no memory for 1.5B parameters
            model = GPT(cfg)
        assert model.num_parameters() == expected == parameter_count(cfg)


def tiny_model(seed: int = 0, block: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_for("tiny", VOCAB, block))


def test_forward_shape_and_causal_mask() -> None:
    model = tiny_model().eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, VOCAB)
    assert torch.equal(a[:, :10], b[:, :10])  # earlier positions never see a later token
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="longer than the block size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_head_stays_dense_and_blocks_are_prunable() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    names = [name for name, _ in prunable_parameters(model)]
    expected = [f"h.{i}.{m}.weight" for i in range(4) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert names == expected  # attention and MLP matrices; not wte/wpe/lm_head, not norms


def test_gpt2_init_scales_residual_projections() -> None:
    model = tiny_model()
    block = model.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.05)
    assert block.attn.c_attn.bias.abs().sum().item() == 0.0


def test_unknown_size_is_one_line() -> None:
    with pytest.raises(ConfigError, match="unknown GPT-2 size 'huge'; choose one of: tiny, 124m") as info:
        config_for("huge")
    assert "\n" not in str(info.value)
    assert set(SIZES) == {"tiny", "124m", "350m", "774m", "1558m"}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No tiktoken cache, and any attempt to read a URL fails the test."""
    real = tiktoken.load.read_file

    def local_only(path: str) -> bytes:
        assert "://" not in path, f"tried to fetch {path}"
        return real(path)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def test_tokenizer_builds_offline_from_the_wheel(offline: Path) -> None:
    assert not tokenizer.official_cache_complete()
    enc = tokenizer.from_wheel()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT] == [50256]
    assert enc.n_vocab == tokenizer.VOCAB == 50257
    assert enc.decode(enc.encode_ordinary("pruning during training")) == "pruning during training"
    assert list(offline.iterdir()) == []  # nothing copied into tiktoken's cache either


def test_tiktoken_cache_is_used_only_when_complete_and_intact(offline: Path) -> None:
    files = tokenizer.wheel_files()
    for name, (url, _) in tokenizer._FILES.items():
        shutil.copy(files[name], offline / hashlib.sha1(url.encode()).hexdigest())
    assert tokenizer.official_cache_complete()
    victim = offline / hashlib.sha1(tokenizer._FILES["vocab.bpe"][0].encode()).hexdigest()
    victim.write_bytes(victim.read_bytes()[:-10])  # tiktoken would delete it and download again
    assert not tokenizer.official_cache_complete()


def test_tiny_training_run_lowers_validation_perplexity(tmp_path: Path) -> None:
    spec = synthetic_spec(tmp_path)
    run_dir = tmp_path / spec.name
    run_dir.mkdir()
    spec.write(run_dir / "spec.json")
    assert run_mod.run(run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = evals[0]["val"], evals[-1]["val"]
    assert last["perplexity"] < 0.7 * first["perplexity"], (first, last)
    assert last["perplexity"] == pytest.approx(np.exp(last["loss"]))
    assert summary["metric"] == {"name": "perplexity", "higher_is_better": False, "unit": ""}
    assert summary["throughput"]["unit"] == "tokens/s" and summary["throughput"]["value"] > 0
    assert summary["test_at_best"]["perplexity"] > 1.0
    # the same fixed windows every time: evaluating twice gives the same number
    model = TASK.build_model(spec)
    assert TASK.evaluate(model, spec, "val") == TASK.evaluate(model, spec, "val")
    assert TASK.examples_per_epoch(spec) == 20_000 // 16


def test_every_model_option_reaches_the_task(make_config) -> None:
    cfg = config.load(make_config("CONFIG_MODEL_GPT2=y\nCONFIG_GPT2_DATASET_TEXT=y\nCONFIG_GPT2_SIZE_TINY=y\n"
                                  'CONFIG_GPT2_INIT_HF="hf/gpt2"\n'))
    options = cfg.model_options["gpt2"]
    assert options == {"size": "tiny", "dataset": "text", "text_dir": "data/text", "block_size": 1024,
                       "vocab_size": PADDED_VOCAB, "token_budget": 100_000_000, "init_hf": "hf/gpt2"}
    spec = RunSpec(name="x", model="gpt2", seed=1, optim=OptimSettings("adamw", 1e-3, 0.0), prune=PruneSettings(),
                   train=TrainSettings(batch_size=8), hardware=HardwarePlan("cpu", 8, 1), model_options=options)
    o = Options.of(spec)
    assert (o.size, o.dataset, o.block_size, o.vocab_size, o.token_budget) == ("tiny", "text", 1024, 50304, 10**8)
    assert o.text_dir == ROOT / "data" / "text" and o.init_hf == ROOT / "hf" / "gpt2"
    assert Options.of(dataclasses.replace(spec, model_options={**options, "init_hf": ""})).init_hf is None


GPT2_DEFCONFIGS = sorted(p.name for p in (ROOT / "defconfigs").glob("gpt2-*"))


@pytest.mark.parametrize("name", GPT2_DEFCONFIGS)
def test_gpt2_defconfigs_load(name: str, tmp_path: Path) -> None:
    cfg = config.load(resolve_defconfig((ROOT / "defconfigs" / name).read_text(), tmp_path / ".config"))
    assert cfg.models == ("gpt2",) and cfg.results_name == name


def test_spam_vs_bitter7_matrix_is_exactly_two_runs(tmp_path: Path) -> None:
    text = (ROOT / "defconfigs" / "gpt2-finewebedu-spam-vs-bitter7").read_text()
    specs = matrix.expand(config.load(resolve_defconfig(text, tmp_path / ".config")))
    assert [(s.optimizer, s.prune.variant, s.pruning, s.sparsity) for s in specs] == [
        ("adamwspam", "", "magnitude", 0.5), ("adamwprune", "bitter7", "state", 0.5)]
    assert {s.optim.lr for s in specs} == {6e-4} and {s.optim.weight_decay for s in specs} == {0.1}
    assert specs[1].optim.base == "adamwspam"
    assert all(s.model_options["size"] == "124m" and s.model_options["dataset"] == "finewebedu" for s in specs)


def test_activation_checkpointing_trains_to_the_same_numbers(tmp_path: Path) -> None:
    """The trainer applies the plan's policy (lib/hardware/actckpt.py); the loss curve is bit-identical on the CPU."""
    from lib import hardware

    curves, records = {}, {}
    for policy in ("none", "sqrt"):
        spec = synthetic_spec(tmp_path, name=f"ckpt-{policy}", max_iters=6)
        plan = hardware.plan(spec, hardware.HardwareSettings(act_ckpt=policy), hardware.Devices("cpu", cpu_cores=2))
        spec = dataclasses.replace(spec, hardware=dataclasses.replace(
            spec.hardware, act_ckpt=plan.act_ckpt, act_ckpt_segments=plan.act_ckpt_segments))
        run_dir = tmp_path / spec.name
        run_dir.mkdir()
        spec.write(run_dir / "spec.json")
        assert run_mod.run(run_dir) == 0
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["spec"]["hardware"]["act_ckpt"] == policy
        curves[policy] = [json.loads(line)["val"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        records[policy] = summary["activations"]
    assert curves["none"] and curves["none"] == curves["sqrt"]
    assert records["sqrt"]["policy"] == "sqrt" and records["sqrt"]["segments"] == [[0, 1, False], [2, 3, False]]
    assert records["none"]["segments"] == [] and "estimated_bytes" not in records["none"]
    if records["none"]["measured_bytes"] is not None:  # glibc's malloc count (mallinfo2, glibc >= 2.33)
        assert records["sqrt"]["measured_bytes"] < 0.75 * records["none"]["measured_bytes"]
    assert records["sqrt"]["estimated_bytes"] < 0.75 * records["sqrt"]["estimated_bytes_without"]
