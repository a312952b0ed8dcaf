"""Parameter groups: which parameters get weight decay.

Decaying biases, normalisation gains and embeddings hurts more than it helps
(it pulls LayerNorm gains and token vectors towards zero), so they go in a
group with ``weight_decay=0``. Every other parameter (Linear / Conv weights)
gets the configured decay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lib.core.spec import OptimSettings

# Modules whose weights are lookup tables rather than linear maps.
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def embedding_param_ids(model: nn.Module) -> set[int]:
    """Identities of every embedding table's parameters (a tied head shares one of them)."""
    return {id(p) for m in model.modules() if isinstance(m, EMBEDDING_TYPES) for p in m.parameters()}


def decays(param: nn.Parameter, embedding_ids: set[int]) -> bool:
    """True for parameters that should get weight decay: matrices and kernels, not tables."""
    # ndim < 2 covers biases and every norm's weight/bias without listing norm types.
    return param.ndim >= 2 and id(param) not in embedding_ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into a decayed and a non-decayed group.

    Each parameter appears exactly once (shared parameters are deduplicated by
    identity, as ``named_parameters`` does). ``params`` holds ``(name, param)``
    pairs, which torch optimizers accept and record as ``param_names`` in their
    state dict, so checkpoints say which tensor each state entry belongs to.
    Empty groups are left out.
    """
    embedding_ids = embedding_param_ids(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        (decay if decays(param, embedding_ids) else no_decay).append((name, param))
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adam_kwargs(model: nn.Module, settings: OptimSettings) -> dict[str, Any]:
    """The constructor arguments every Adam-family optimizer shares: groups, lr, betas, eps, weight decay."""
    return {
        "params": param_groups(model, settings.weight_decay),
        "lr": settings.lr,
        "betas": (settings.beta1, settings.beta2),
        "eps": settings.eps,
        "weight_decay": settings.weight_decay,
    }
