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

import torch
import torch.nn.functional as F
from torch import nn

from lib.errors import ConfigError
from lib.structures import Part, ResidualBlock, Structure, rows_and_columns

PADDED_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64: faster matmuls, unused rows never seen


@dataclass(frozen=True)
class GPTConfig:
    """The shape of one GPT-2 model."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = PADDED_VOCAB
    block_size: int = 1024  # longest sequence: rows of the positional embedding


# The published GPT-2 sizes (small, medium, large, XL) and a tiny one for CPU tests.
SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128),
    "124m": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "350m": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "774m": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "1558m": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}


def config_for(size: str, vocab_size: int = PADDED_VOCAB, block_size: int = 1024) -> GPTConfig:
    """The GPTConfig of a named size; ConfigError listing the sizes if ``size`` is unknown."""
    if size not in SIZES:
        raise ConfigError(f"unknown GPT-2 size {size!r}; choose one of: {', '.join(SIZES)} (CONFIG_GPT2_SIZE_*)")
    return replace(SIZES[size], vocab_size=vocab_size, block_size=block_size)


def parameter_count(cfg: GPTConfig) -> int:
    """Parameters of GPT(cfg) from its shapes alone, the tied embedding/head counted once."""
    d = cfg.n_embd
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * per_block + 2 * d


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward): 6N + 12 L d T, N without position embeddings
    (PaLM, appendix B; the estimate nanoGPT's MFU uses)."""
    weights = parameter_count(cfg) - cfg.block_size * cfg.n_embd
    return 6 * weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"GPT-2 width {cfg.n_embd} is not divisible by its {cfg.n_head} heads")
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # query, key and value in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        heads = (batch, seq, self.n_head, width // self.n_head)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head width)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused kernel with the causal mask built in
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, width))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (GPT-2's tanh form), project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """One pre-norm transformer block with two residual branches."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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
        """Heads and MLP neurons of every block (lib/structures.py)."""
        width, found = self.config.n_embd, []
        per_head = width // self.config.n_head
        for i in range(self.config.n_layer):
            attn, mlp = f"h.{i}.attn", f"h.{i}.mlp"
            for h in range(self.config.n_head):
                cols = tuple(range(h * per_head, (h + 1) * per_head))
                qkv = tuple(k * width + c for k in range(3) for c in cols)  # its rows of q, k and v
                found.append(Structure("head", attn, (Part(f"{attn}.c_attn.weight", 0, qkv),
                                                      Part(f"{attn}.c_proj.weight", 1, cols))))
            found += rows_and_columns("neuron", mlp, f"{mlp}.c_fc.weight", f"{mlp}.c_proj.weight", 4 * width)
        return found

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
