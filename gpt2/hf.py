"""GPT-2 in and out of Hugging Face transformers' format (docs/huggingface.md).

transformers' ``GPT2LMHeadModel`` differs from gpt2/model.py in three ways, all handled here:
- key names: ``transformer.`` before every weight but the head (``transformer.h.3.attn.c_attn.weight``);
- its four projections are ``Conv1D``: weights stored (in, out), the transpose of ``nn.Linear``'s;
- its config holds one head count and one MLP width for every layer.

A model cut by surgery keeps fewer heads or neurons in some layers. It is written padded back to
uniform widths with exact zeros: a padded head has zero query, key and value rows and biases (so
its attention output, the mean of zero values, is zero) and zero output columns; a padded neuron
has a zero input row and bias (GELU(0) = 0) and a zero output column. The logits are unchanged.
Heads pad to the configured count (GPT-2 ties the head width to n_embd / n_head); the MLP pads to
its widest layer. Dropped blocks are simply absent: the layers are renumbered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt2 import tokenizer
from gpt2.model import GPT, GPTConfig
from lib.core.errors import ConfigError

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out) by transformers
PREFIX = "transformer."
TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "add_prefix_space": False, "add_bos_token": False}


@dataclass(frozen=True)
class HfModel:
    """A GPT-2 in transformers' format: config.json's contents, the tensors by transformers' names, and
    what the export had to change to get there (for the model card)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: dict[str, bytes]  # the tokenizer's, when the model's vocabulary is the GPT-2 BPE's
    notes: dict[str, Any]


@torch.no_grad()
def to_hf(model: GPT) -> HfModel:
    """``model`` as transformers' GPT2LMHeadModel holds it (padded to uniform widths after surgery)."""
    cfg = model.config
    d, heads, head_dim = cfg.n_embd, cfg.n_head, cfg.head_dim
    widest = max(cfg.layer_mlp(i) for i in range(cfg.n_layer))
    out = {f"{PREFIX}wte.weight": model.wte.weight, f"{PREFIX}wpe.weight": model.wpe.weight,
           f"{PREFIX}ln_f.weight": model.ln_f.weight, f"{PREFIX}ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.h):
        p = f"{PREFIX}h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[p + f"{norm}.weight"], out[p + f"{norm}.bias"] = getattr(block, norm).weight, getattr(block, norm).bias
        inner = cfg.layer_heads(i) * head_dim
        qkv_w, qkv_b = block.attn.c_attn.weight.new_zeros(3 * d, d), block.attn.c_attn.bias.new_zeros(3 * d)
        for k in range(3):  # q, k and v each keep their first `inner` rows; the padded heads' rows stay zero
            qkv_w[k * d:k * d + inner] = block.attn.c_attn.weight[k * inner:(k + 1) * inner]
            qkv_b[k * d:k * d + inner] = block.attn.c_attn.bias[k * inner:(k + 1) * inner]
        out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"] = qkv_w.t(), qkv_b
        out[p + "attn.c_proj.weight"] = _pad(block.attn.c_proj.weight, (d, d)).t()
        out[p + "attn.c_proj.bias"] = block.attn.c_proj.bias
        out[p + "mlp.c_fc.weight"] = _pad(block.mlp.c_fc.weight, (widest, d)).t()
        out[p + "mlp.c_fc.bias"] = _pad(block.mlp.c_fc.bias, (widest,))
        out[p + "mlp.c_proj.weight"] = _pad(block.mlp.c_proj.weight, (d, widest)).t()
        out[p + "mlp.c_proj.bias"] = block.mlp.c_proj.bias
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in out.items()}
    heads_now = [cfg.layer_heads(i) for i in range(cfg.n_layer)]
    mlp_now = [cfg.layer_mlp(i) for i in range(cfg.n_layer)]
    padded = heads_now != [heads] * cfg.n_layer or mlp_now != [widest] * cfg.n_layer
    bpe = cfg.vocab_size >= tokenizer.VOCAB  # a model trained on GPT-2 BPE tokens (tests use tiny vocabularies)
    files = {**tokenizer_files(), "tokenizer_config.json": json.dumps(
        {**TOKENIZER_CONFIG, "model_max_length": cfg.block_size}, indent=1).encode()} if bpe else {}
    notes = {"vocab_rows": cfg.vocab_size,
             "tokenizer": f"GPT-2 BPE, {tokenizer.VOCAB} ids" if bpe else
             f"none written: the model's {cfg.vocab_size} rows are fewer than the GPT-2 BPE's {tokenizer.VOCAB} ids",
             "padded_vocab_rows": f"kept ({cfg.vocab_size - tokenizer.VOCAB}): the tokenizer never produces their ids"
             if cfg.vocab_size > tokenizer.VOCAB else "none",
             "padded_to_uniform_widths": {"heads": heads_now, "mlp": mlp_now, "to_heads": heads, "to_mlp": widest}
             if padded else None,
             "parameters_true": sum(p.numel() for p in model.parameters()),
             "parameters_stored": sum(t.numel() for t in tensors.values())}
    return HfModel(config(cfg, widest), tensors, files, notes)


def config(cfg: GPTConfig, mlp_width: int) -> dict[str, Any]:
    """transformers' GPT2Config for ``cfg`` (no dropout: the harness trains without it)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": mlp_width, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
            "scale_attn_weights": True, "tie_word_embeddings": True, "torch_dtype": "float32",
            **({"bos_token_id": tokenizer.EOT, "eos_token_id": tokenizer.EOT} if cfg.vocab_size > tokenizer.EOT
               else {})}


def tokenizer_files() -> dict[str, bytes]:
    """transformers' GPT2Tokenizer files from the harness's offline BPE (the same bytes, transformers' names)."""
    found = tokenizer.wheel_files()
    return {"vocab.json": found["encoder.json"].read_bytes(), "merges.txt": found["vocab.bpe"].read_bytes()}


def from_hf(folder: Path, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A state dict for ``GPT(cfg)`` from a transformers GPT-2 folder; ConfigError (one line) when the folder
    is of another architecture, size or tokenizer. Missing vocabulary rows (50257 -> 50304) become zeros;
    positions past the harness's block size are dropped; a narrower MLP is padded with zero neurons."""
    folder = Path(folder)
    hf = _read_config(folder)
    for key, ours in (("n_layer", cfg.n_layer), ("n_head", cfg.n_head), ("n_embd", cfg.n_embd)):
        if hf.get(key) != ours:
            raise ConfigError(f"{folder}: {key} is {hf.get(key)} there but {ours} in the configured GPT-2 size; "
                              f"choose the matching CONFIG_GPT2_SIZE_* or another folder")
    if hf.get("n_positions", 0) < cfg.block_size:
        raise ConfigError(f"{folder}: {hf.get('n_positions')} positions, fewer than CONFIG_GPT2_BLOCK_SIZE="
                          f"{cfg.block_size}; lower the block size")
    if hf.get("vocab_size", 0) > cfg.vocab_size:
        raise ConfigError(f"{folder}: vocabulary of {hf.get('vocab_size')} rows, more than CONFIG_GPT2_VOCAB_SIZE="
                          f"{cfg.vocab_size}; raise it")
    check_tokenizer(folder)
    tensors = _read_tensors(folder)
    d, width = cfg.n_embd, cfg.layer_mlp(0)
    state = {"wte.weight": _pad(tensors["wte.weight"], (cfg.vocab_size, d)),
             "wpe.weight": tensors["wpe.weight"][:cfg.block_size],
             "ln_f.weight": tensors["ln_f.weight"], "ln_f.bias": tensors["ln_f.bias"]}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                     "mlp.c_proj.bias"):
            state[p + name] = tensors[p + name]
        state[p + "attn.c_attn.weight"] = tensors[p + "attn.c_attn.weight"].t()
        state[p + "attn.c_proj.weight"] = tensors[p + "attn.c_proj.weight"].t()
        state[p + "mlp.c_fc.weight"] = _pad(tensors[p + "mlp.c_fc.weight"].t(), (width, d))
        state[p + "mlp.c_fc.bias"] = _pad(tensors[p + "mlp.c_fc.bias"], (width,))
        state[p + "mlp.c_proj.weight"] = _pad(tensors[p + "mlp.c_proj.weight"].t(), (d, width))
    state["lm_head.weight"] = state["wte.weight"]
    with torch.device("meta"):  # shapes only
        expected = {name: tuple(t.shape) for name, t in GPT(cfg).state_dict().items()}
    for name, shape in expected.items():
        if name not in state or tuple(state[name].shape) != shape:
            got = tuple(state[name].shape) if name in state else "nothing"
            raise ConfigError(f"{folder}: {name} has shape {got}, the configured GPT-2 needs {shape}")
    return {name: t.contiguous() for name, t in state.items()}


def check_tokenizer(folder: Path) -> None:
    """The folder's tokenizer, when it has one, must be the GPT-2 BPE the harness tokenizes with."""
    ours = tokenizer_files()
    for name in ("vocab.json", "merges.txt"):
        path = folder / name
        if not path.is_file():
            continue
        theirs = path.read_bytes()
        same = json.loads(theirs) == json.loads(ours[name]) if name.endswith(".json") else \
            theirs.decode().split() == ours[name].decode().split()
        if not same:
            raise ConfigError(f"{path} differs from the GPT-2 BPE the harness's shards are tokenized with; "
                              f"this model was trained on another tokenizer")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no config.json: not a transformers model folder") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        got = hf.get("model_type") if isinstance(hf, dict) else None
        raise ConfigError(f"{folder}: model_type {got!r}, not 'gpt2'; only GPT-2 folders can be imported")
    if hf.get("activation_function", "gelu_new") != "gelu_new" or not hf.get("tie_word_embeddings", True):
        raise ConfigError(f"{folder}: a GPT-2 variant (activation {hf.get('activation_function')!r}, tied "
                          f"embeddings {hf.get('tie_word_embeddings', True)}) that gpt2/model.py does not build")
    return hf


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{folder} has no model.safetensors (save it with safe_serialization, the default)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    # transformers writes "transformer.h.0..."; the original GPT-2 upload has no prefix. The head is tied.
    return {name.removeprefix(PREFIX): t.float() for name, t in tensors.items() if name != "lm_head.weight"}


def _pad(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` in the top-left corner of zeros of ``shape`` (a no-op copy when the shapes agree)."""
    if tuple(tensor.shape) == shape:
        return tensor
    if any(have > want for have, want in zip(tensor.shape, shape, strict=True)):
        raise ConfigError(f"a tensor of shape {tuple(tensor.shape)} does not fit in {shape}")
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


__all__ = ["HfModel", "TOKENIZER_CONFIG", "check_tokenizer", "config", "from_hf", "to_hf", "tokenizer_files"]
