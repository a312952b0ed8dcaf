"""A decoder-only transformer in the GPT-2 layout (Radford et al. 2019).

Learned positional embeddings, pre-norm blocks (LayerNorm -> causal
self-attention, LayerNorm -> 4x MLP with GELU), a final LayerNorm and an output
head tied to the token embedding. Every matrix is an ``nn.Linear`` so the
pruners see attention and MLP weights; the tied head shares the embedding table,
which lib/pruning leaves dense. Mixed precision is the trainer's business, not
the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib.core.errors import ConfigError
from lib.core.structures import Part, ResidualBlock, Structure, rows_and_columns

PADDED_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64: faster matmuls, unused rows never seen


@dataclass(frozen=True)
class GPTConfig:
    """The shape of one GPT-2 model."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = PADDED_VOCAB
    block_size: int = 1024  # longest sequence: rows of the positional embedding
    # After surgery (lib/surgery/cut.py) layers differ: heads kept and MLP width of each layer; () = uniform.
    heads: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPT-2 width {self.n_embd} is not divisible by its {self.n_head} heads")
        for name, widths in (("heads", self.heads), ("mlp", self.mlp)):
            if widths and (len(widths) != self.n_layer or min(widths) < 1):
                raise ConfigError(f"GPT-2 architecture: {name} {list(widths)} must give each of the "
                                  f"{self.n_layer} layers at least 1")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_heads(self, layer: int) -> int:
        return self.heads[layer] if self.heads else self.n_head

    def layer_mlp(self, layer: int) -> int:
        return self.mlp[layer] if self.mlp else 4 * self.n_embd


# The published GPT-2 sizes (small, medium, large, XL) and a tiny one for CPU tests.
SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128),
    "124m": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "350m": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "774m": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "1558m": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}


def config_for(size: str, vocab_size: int = PADDED_VOCAB, block_size: int = 1024,
               architecture: dict[str, Any] | None = None) -> GPTConfig:
    """The GPTConfig of a named size, or of what surgery left of it (``architecture``, from
    GPT.architecture()); ConfigError listing the sizes if ``size`` is unknown."""
    if size not in SIZES:
        raise ConfigError(f"unknown GPT-2 size {size!r}; choose one of: {', '.join(SIZES)} (CONFIG_GPT2_SIZE_*)")
    cfg = replace(SIZES[size], vocab_size=vocab_size, block_size=block_size)
    if architecture is None:
        return cfg
    try:
        return replace(cfg, n_layer=int(architecture["n_layer"]), heads=tuple(map(int, architecture["heads"])),
                       mlp=tuple(map(int, architecture["mlp"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"GPT-2 architecture {architecture!r} is not one GPT.architecture() wrote "
                          f"({type(exc).__name__}: {exc})") from None


def parameter_count(cfg: GPTConfig) -> int:
    """Parameters of GPT(cfg) from its shapes alone, the tied embedding/head counted once."""
    d, blocks = cfg.n_embd, 0
    for i in range(cfg.n_layer):
        a, m = cfg.layer_heads(i) * cfg.head_dim, cfg.layer_mlp(i)  # attention and MLP widths
        blocks += 2 * d + (3 * d * a + 3 * a) + (a * d + d) + 2 * d + (d * m + m) + (m * d + d)
    return cfg.vocab_size * d + cfg.block_size * d + blocks + 2 * d


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward): 6N + 12 L d T, N without position embeddings
    (PaLM, appendix B; the estimate nanoGPT's MFU uses), L d summed over layers' attention widths."""
    weights = parameter_count(cfg) - cfg.block_size * cfg.n_embd
    attention = sum(cfg.layer_heads(i) for i in range(cfg.n_layer)) * cfg.head_dim
    return 6 * weights + 12 * attention * cfg.block_size


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, cfg: GPTConfig, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, cfg.head_dim
        inner = n_head * cfg.head_dim  # n_embd unless surgery removed heads
        self.c_attn = nn.Linear(cfg.n_embd, 3 * inner)  # query, key and value in one matmul
        self.c_proj = nn.Linear(inner, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(inner, dim=2)
        heads = (batch, seq, self.n_head, self.head_dim)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head width)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused kernel with the causal mask built in
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, inner))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (GPT-2's tanh form), project back."""

    def __init__(self, cfg: GPTConfig, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, width)  # 4 * n_embd unless surgery removed neurons
        self.c_proj = nn.Linear(width, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """One pre-norm transformer block with two residual branches."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, cfg.layer_heads(layer))
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg, cfg.layer_mlp(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    # Surgery cuts heads and neurons by hand (a head's rows of the fused qkv matrix and the matching
    # bias entries; lib/surgery/cut.py's default rule): torch-pruning cannot split a fused qkv into heads.
    surgery_by_hand = True

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one table reads tokens in and scores them out
        self.apply(self._init_weights)
        # GPT-2 scales the init of each residual branch's output projection by 1/sqrt(2 * n_layer),
        # so the residual stream's variance does not grow with depth (two branches per block).
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def structures(self) -> list[Structure]:
        """Heads and MLP neurons of every block (lib/core/structures.py)."""
        cfg, found = self.config, []
        per_head = cfg.head_dim
        for i in range(cfg.n_layer):
            attn, mlp = f"h.{i}.attn", f"h.{i}.mlp"
            inner = cfg.layer_heads(i) * per_head
            for h in range(cfg.layer_heads(i)):
                cols = tuple(range(h * per_head, (h + 1) * per_head))
                qkv = tuple(k * inner + c for k in range(3) for c in cols)  # its rows of q, k and v
                found.append(Structure("head", attn, (Part(f"{attn}.c_attn.weight", 0, qkv),
                                                      Part(f"{attn}.c_proj.weight", 1, cols))))
            found += rows_and_columns("neuron", mlp, f"{mlp}.c_fc.weight", f"{mlp}.c_proj.weight", cfg.layer_mlp(i))
        return found

    def architecture(self) -> dict[str, Any]:
        """What surgery changed, as plain data for a checkpoint (lib/surgery/cut.py; GPT2.build_model reads it)."""
        cfg = self.config
        return {"n_layer": cfg.n_layer, "heads": [cfg.layer_heads(i) for i in range(cfg.n_layer)],
                "mlp": [cfg.layer_mlp(i) for i in range(cfg.n_layer)]}

    def architecture_without(self, removed: list[Structure], blocks: list[str]) -> dict[str, Any]:
        """The architecture once ``removed`` heads and neurons and the blocks named ``blocks`` are gone."""
        arch = self.architecture()
        for unit in removed:
            layer = int(unit.group.split(".")[1])
            arch["heads" if unit.kind == "head" else "mlp"][layer] -= 1
        gone = {int(name.split(".")[1]) for name in blocks}
        for key in ("heads", "mlp"):
            arch[key] = [n for i, n in enumerate(arch[key]) if i not in gone]
        arch["n_layer"] -= len(gone)
        return arch

    def residual_blocks(self) -> list[ResidualBlock]:
        """Every transformer block: with all its parameters zero both branches add exactly 0."""
        return [ResidualBlock(f"h.{i}", block) for i, block in enumerate(self.h)]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Parameters, the tied table counted once (parameters() yields a shared tensor once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        if seq > self.config.block_size:
            raise ValueError(f"sequence of {seq} tokens is longer than the block size {self.config.block_size}")
        pos = torch.arange(seq, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
