"""The GPT-2 task plug-in: what lib/ needs to train and evaluate GPT-2 on token shards.

model_options (from gpt2/Kconfig): size, dataset, block_size, vocab_size,
token_budget, text_dir, init_hf. Shards are prepared by `make prepare-data` (fetch_data)
and only read here; a run whose data is missing, stale or corrupt stops with one
line naming the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpt2 import hf, prepare, tokenizer
from gpt2.data import Shards, eval_windows, load_shards, train_batches
from gpt2.model import GPT, PADDED_VOCAB, config_for, flops_per_token
from gpt2.sources import DATASETS, SPLITS, source_of
from lib.core.errors import ConfigError
from lib.core.provenance import file_sha256
from lib.core.spec import RunSpec
from lib.core.task import Batch, Metric
from lib.train import distributed
from lib.train.distributed import SINGLE, Shard

ROOT = Path(__file__).resolve().parent.parent
# Micro-batch per GPU for GPT-2 124M at block 1024 (docs/algorithms.md, "GPU micro-batch table"). B200, W7900
# and A10G are the published single-GPU choices (effective batch 1024: grad-accum 8, 32, 128). The
# other rows are ours, placed by memory size between those three; no run of ours has measured them.
GPU_MICRO_BATCH_124M = {
    "B200": 128, "H200": 128, "MI300X": 128,
    "H100": 64, "A100-80GB": 64,
    "A100-40GB": 32, "L40S": 32, "L40": 32, "W7900": 32, "MI210": 32,
    "A10G": 8, "L4": 8,
}
CPU_MICRO_BATCH = 8  # beyond it a CPU step only gets slower per token (measured on a 2-core CPU VM)
DEFAULT_EVAL_WINDOWS = 50  # with EVAL_BATCHES = 0: a fixed sample, since a corpus split can be huge
EVAL_CHUNK = 16  # windows per evaluation forward pass, at most


@dataclass(frozen=True)
class Options:
    """spec.model_options, typed and checked (defaults are the Kconfig defaults)."""

    size: str
    dataset: str
    block_size: int
    vocab_size: int
    token_budget: int
    text_dir: Path | None
    init_hf: Path | None = None  # CONFIG_GPT2_INIT_HF: a transformers GPT-2 folder to start from

    @classmethod
    def of(cls, spec: RunSpec) -> Options:
        o = spec.model_options
        dataset = o.get("dataset", "finewebedu")
        if dataset not in DATASETS:
            raise ConfigError(f"unknown GPT-2 dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
        text_dir = None
        if dataset == "text":
            if not o.get("text_dir"):
                raise ConfigError("CONFIG_GPT2_TEXT_DIR is empty; name the folder of .txt files to train on")
            text_dir = Path(o["text_dir"]) if os.path.isabs(o["text_dir"]) else ROOT / o["text_dir"]
        init = o.get("init_hf") or None
        opts = cls(o.get("size", "124m"), dataset, int(o.get("block_size", 1024)),
                   int(o.get("vocab_size", PADDED_VOCAB)), int(o.get("token_budget", 100_000_000)), text_dir,
                   (Path(init) if os.path.isabs(init) else ROOT / init) if init else None)
        config_for(opts.size)  # an unknown size fails here, before any data is read
        return opts

    @property
    def source(self) -> str:
        return source_of(self.dataset, self.text_dir)


class GPT2Task:
    """GPT-2 language modelling; shards are checked once per (folder, settings) and read lazily."""

    name = "gpt2"
    metric = Metric("perplexity", higher_is_better=False)
    sample_unit = "tokens"

    def __init__(self) -> None:
        self._shards: dict[tuple, Shards] = {}
        self._eval: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}

    def _data(self, spec: RunSpec) -> Shards:
        o = Options.of(spec)
        root = prepare.shard_dir(spec.data_dir, o.dataset)
        key = (str(root.resolve()), o)
        if key not in self._shards:
            self._shards[key] = load_shards(root, dataset=o.dataset, source=o.source, token_budget=o.token_budget,
                                            vocab_size=o.vocab_size, block_size=o.block_size)
        return self._shards[key]

    # Sources that need no network and take seconds: prepared on first use, so
    # `make defconfig-gpt2-tiny-cpu && make` works; the others need `make prepare-data`.
    OFFLINE_SOURCES = ("pydoc",)

    def prepare(self, spec: RunSpec) -> None:
        if Options.of(spec).dataset in self.OFFLINE_SOURCES:
            meta = prepare.shard_dir(spec.data_dir, Options.of(spec).dataset) / "meta.json"
            if not meta.exists():
                print(f"gpt2: {self.fetch_data(spec, workers=1)}", flush=True)
        self._data(spec)

    def data_fingerprint(self, spec: RunSpec) -> dict[str, str]:
        """The token files' SHA-256 (hashed once per file version in this process) and their source."""
        shards = self._data(spec)
        found = {"source": Options.of(spec).source}
        for split in SPLITS:
            path = shards.root / f"{split}.bin"
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = file_sha256(path)
            found[f"{split}_sha256"] = self._hashes[key]
        return found

    def usage(self, spec: RunSpec) -> dict[str, str]:
        """What running an export outside the harness needs (gpt2/tokenizer.py, gpt2/model.py)."""
        o = Options.of(spec)
        return {"tokenizer": f"GPT-2 BPE (tiktoken '{tokenizer.NAME}', {tokenizer.VOCAB} ids, <|endoftext|> = "
                             f"{tokenizer.EOT}); the embedding is padded to {o.vocab_size} rows",
                "input": f"int64 token ids, at most {o.block_size} per sequence",
                "forward": "token + learned position embeddings, pre-LayerNorm blocks (causal self-attention; MLP "
                           "widening 4x with tanh-approximated GELU), final LayerNorm, head tied to the token "
                           "embedding (logits over the padded vocabulary)"}

    def fetch_data(self, spec: RunSpec, workers: int | None = None) -> str:
        """Tokenize the configured dataset into shards (`make prepare-data`); resumes an interrupted run."""
        o = Options.of(spec)
        out = prepare.shard_dir(spec.data_dir, o.dataset)
        workers = min(os.cpu_count() or 1, 16) if workers is None else workers
        meta = prepare.prepare_dataset(o.dataset, out, source=o.source, token_budget=o.token_budget,
                                       text_dir=o.text_dir, workers=workers)
        counts = ", ".join(f"{s} {n:,}" for s, n in meta["tokens"].items())
        return (f"{o.dataset} ready in {out} ({meta['documents']:,} documents; tokens {counts}; "
                f"stopped by {meta['stopped_by']})")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks (``model.h``), for activation checkpointing."""
        return list(model.h)

    def build_model(self, spec: RunSpec, architecture: dict | None = None) -> nn.Module:
        o = Options.of(spec)
        return GPT(config_for(o.size, o.vocab_size, o.block_size, architecture))

    def initial_state(self, spec: RunSpec) -> dict[str, torch.Tensor] | None:
        """CONFIG_GPT2_INIT_HF: the pretrained weights a fresh run starts from (gpt2/hf.py), else None."""
        o = Options.of(spec)
        if not o.init_hf:
            return None
        return hf.from_hf(o.init_hf, config_for(o.size, o.vocab_size, o.block_size))

    def to_hf(self, model: nn.Module, spec: RunSpec) -> hf.HfModel:
        """`make export FORMAT=hf`: the model as transformers' GPT2LMHeadModel loads it (gpt2/hf.py)."""
        return hf.to_hf(model)

    def cpu_micro_batch(self, spec: RunSpec) -> int:
        return CPU_MICRO_BATCH

    def gpu_micro_batch(self, spec: RunSpec, gpu: str) -> int | None:
        o = Options.of(spec)
        return GPU_MICRO_BATCH_124M.get(gpu) if (o.size, o.block_size) == ("124m", 1024) else None

    def flops_per_sample(self, spec: RunSpec) -> float | None:
        o = Options.of(spec)
        return float(flops_per_token(config_for(o.size, o.vocab_size, o.block_size)))

    def example_batch(self, spec: RunSpec, n: int, device: torch.device) -> Batch:
        tokens = torch.zeros(n, Options.of(spec).block_size, dtype=torch.int64, device=device)
        return tokens, tokens

    def examples_per_epoch(self, spec: RunSpec) -> int:
        return max(1, self._data(spec).tokens["train"] // Options.of(spec).block_size)

    def train_batches(self, spec: RunSpec, micro_batch: int, seed: int, shard: Shard = SINGLE,
                      start: int = 0) -> Iterator[Batch]:
        return train_batches(self._data(spec), Options.of(spec).block_size, micro_batch, seed, shard, start)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return logits.view(-1, logits.size(-1)), y.reshape(-1)

    def samples_in(self, batch: Batch) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, spec: RunSpec, split: str, shard: Shard = SINGLE) -> dict[str, float]:
        """Mean next-token cross-entropy and its exp (perplexity) on a fixed set of windows of "val" or "test".

        With several ranks each evaluates every world-th chunk of windows and the loss sums are reduced.
        """
        if split not in ("val", "test"):
            raise ValueError(f"evaluate: split must be 'val' or 'test', got {split!r}")
        shards, block = self._data(spec), Options.of(spec).block_size
        n_windows = spec.train.eval_batches or DEFAULT_EVAL_WINDOWS
        key = (str(shards.root), tuple(shards.tokens.values()), split, block, n_windows)
        if key not in self._eval:
            self._eval[key] = eval_windows(shards, split, block, n_windows)
        x_all, y_all = self._eval[key]
        device = next(model.parameters()).device
        # training fits micro_batch windows; the cap bounds the fp32 logits (16 x 1024 x 50304 x 4 B = 3.3 GB)
        step = max(1, min(spec.hardware.micro_batch, EVAL_CHUNK))
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for i in shard.chunks(len(x_all), step):
                    x, y = x_all[i:i + step].to(device), y_all[i:i + step].to(device)
                    logits = model(x)
                    total += F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1),
                                             reduction="sum").item()
        finally:
            model.train(was_training)
        loss = distributed.reduce_sum(total)[0] / y_all.numel()
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp(>709) overflows a float


TASK = GPT2Task()
