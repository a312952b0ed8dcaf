"""The masked steps of masked_step.c written in torch ops: compiled on a GPU, the reference in tests.

Each reads the weight, gradient, both moments and the packed mask and writes the
weight and moments, with pruned entries written as +0.0. Under ``torch.compile``
inductor fuses each into one kernel (Triton on a GPU). The scalars arrive as 0-dim
tensors, so a new learning rate or step count never recompiles, and the tensors as
flat views of whole bit-planes, so one graph serves every size (``dynamic=True``).

Only for sizes that are a multiple of 8 (whole planes); the caller masks the
gradient of any other tensor and lets the base optimizer step it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def _keep(packed: Tensor) -> Tensor:
    """(8, M) bool keep-mask of a packed mask of M bytes (bit j of byte i keeps entry j * M + i)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device).view(8, 1)
    return ((packed.view(1, -1).to(torch.int32) >> shifts) & 1) != 0


def _planes(packed: Tensor, *tensors: Tensor) -> list[Tensor]:
    m = packed.numel()
    return [t.view(8, m) for t in tensors]


def masked_adamw(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, decay: Tensor, beta1: Tensor,
                 beta2: Tensor, step_size: Tensor, bc2_sqrt: Tensor, eps: Tensor) -> None:
    """torch's AdamW rule with the mask inside it (masked_step.c, harness_masked_step_f32)."""
    keep = _keep(packed)
    p2, g2, m2, v2 = _planes(packed, p, g, m, v)
    grad = torch.where(keep, g2, 0.0)
    m_new = m2 + (1 - beta1) * (grad - m2)
    v_new = v2 * beta2 + (1 - beta2) * grad * grad
    p_new = p2 * decay - step_size * m_new / (v_new.sqrt() / bc2_sqrt + eps)
    p2.copy_(torch.where(keep, p_new, 0.0))
    m2.copy_(torch.where(keep, m_new, 0.0))
    v2.copy_(torch.where(keep, v_new, 0.0))


def masked_spam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, clip: Tensor, theta: Tensor,
                beta1: Tensor, beta2: Tensor, step: Tensor, eps: Tensor, decay: Tensor) -> None:
    """The released SPAM rule with the mask inside it (masked_step.c, harness_masked_step_f32)."""
    keep = _keep(packed)
    p2, g2, m2, v2 = _planes(packed, p, g, m, v)
    grad = torch.where(keep, g2, 0.0)
    bound = v2 * theta
    spiked = (grad * grad > bound) & clip
    grad = torch.where(spiked, grad.sign() * bound.sqrt(), grad)
    m_new = m2 + (1 - beta1) * (grad - m2)
    v_new = v2 * beta2 + (1 - beta2) * grad * grad
    p_new = (p2 + step * (m_new / (v_new.sqrt() + eps))) * decay
    p2.copy_(torch.where(keep, p_new, 0.0))
    m2.copy_(torch.where(keep, m_new, 0.0))
    v2.copy_(torch.where(keep, v_new, 0.0))


KERNELS: dict[str, Callable[..., None]] = {"adamw": masked_adamw, "spam": masked_spam}


@functools.cache
def compiled(name: str) -> Callable[..., None]:
    """``KERNELS[name]`` under torch.compile (compiled on its first call; one graph for all sizes)."""
    return torch.compile(KERNELS[name], dynamic=True)
