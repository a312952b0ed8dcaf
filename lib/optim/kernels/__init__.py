"""Fused kernels: AdamWPrune's masked optimizer steps and the one-pass mask update.

Where each runs:
- CPU, float32: the C kernels of masked_step.c (lib/optim/kernels/native.py), built once
  with the system C compiler;
- CUDA: the same steps in torch ops (lib/optim/kernels/torch_kernels.py) under
  torch.compile, which inductor turns into one Triton kernel each;
- anything else (another dtype, a strided tensor, a size that is not whole bit-planes
  on a GPU): the ``masked_*_`` functions return False and the caller takes the eager
  path (mask the gradient, then the base optimizer's own step).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import Tensor

from lib.optim import bitmask
from lib.optim.kernels import native, torch_kernels


def why_unavailable(device_type: str) -> str:
    """Empty when fused masked steps can run on ``device_type`` ("cpu", "cuda"), else the one-line reason."""
    if device_type == "cpu":
        return native.why_unavailable()
    if device_type == "cuda":
        return "" if importlib.util.find_spec("triton") else "torch.compile has no triton for the GPU"
    return f"no fused kernel for device type {device_type!r}"


def _on_gpu(*tensors: Tensor) -> bool:
    return all(t.is_cuda and t.is_contiguous() for t in tensors) and tensors[0].numel() % 8 == 0


def _scalars(device: torch.device, *values: float) -> list[Tensor]:
    return [torch.tensor(x, dtype=torch.float32, device=device) for x in values]


def masked_adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, *, decay: float, beta1: float,
                  beta2: float, step_size: float, bc2_sqrt: float, eps: float) -> bool:
    """One fused masked AdamW update in place; False (nothing done) when no kernel takes these tensors."""
    if native.fits(p, g, m, v):
        native.masked_adamw_(p, g, m, v, packed, decay=decay, beta1=beta1, beta2=beta2, step_size=step_size,
                             bc2_sqrt=bc2_sqrt, eps=eps)
        return True
    if _on_gpu(p, g, m, v):
        torch_kernels.compiled("adamw")(p.view(-1), g.view(-1), m.view(-1), v.view(-1), packed,
                                        *_scalars(p.device, decay, beta1, beta2, step_size, bc2_sqrt, eps))
        return True
    return False


def masked_spam_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, *, clip: bool, theta: float,
                 beta1: float, beta2: float, step: float, eps: float, decay: float) -> bool:
    """One fused masked released-SPAM update in place; False when no kernel takes these tensors."""
    if native.fits(p, g, m, v):
        native.masked_spam_(p, g, m, v, packed, clip=clip, theta=theta, beta1=beta1, beta2=beta2, step=step,
                            eps=eps, decay=decay)
        return True
    if _on_gpu(p, g, m, v):
        flag = torch.tensor(clip, device=p.device)
        torch_kernels.compiled("spam")(p.view(-1), g.view(-1), m.view(-1), v.view(-1), packed, flag,
                                       *_scalars(p.device, theta, beta1, beta2, step, eps, decay))
        return True
    return False


def compact_adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, offsets: Tensor, kept: int,
                   chunk: int, *, decay: float, beta1: float, beta2: float, step_size: float, bc2_sqrt: float,
                   eps: float) -> bool:
    """``masked_adamw_`` with ``m`` and ``v`` compact (lib/optim/compact.py); False when no kernel takes them."""
    if native.fits(p, g, m, v):
        native.compact_adamw_(p, g, m, v, packed, offsets, chunk, decay=decay, beta1=beta1, beta2=beta2,
                              step_size=step_size, bc2_sqrt=bc2_sqrt, eps=eps)
        return True
    if _on_gpu(p, g, m, v):
        _gathered("adamw", p, g, m, v, packed, kept, _scalars(p.device, decay, beta1, beta2, step_size, bc2_sqrt, eps))
        return True
    return False


def compact_spam_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, offsets: Tensor, kept: int,
                  chunk: int, *, clip: bool, theta: float, beta1: float, beta2: float, step: float, eps: float,
                  decay: float) -> bool:
    """``masked_spam_`` with ``m`` and ``v`` compact (lib/optim/compact.py); False when no kernel takes them."""
    if native.fits(p, g, m, v):
        native.compact_spam_(p, g, m, v, packed, offsets, chunk, clip=clip, theta=theta, beta1=beta1, beta2=beta2,
                             step=step, eps=eps, decay=decay)
        return True
    if _on_gpu(p, g, m, v):
        flag = [torch.tensor(clip, device=p.device)]
        _gathered("spam", p, g, m, v, packed, kept, flag + _scalars(p.device, theta, beta1, beta2, step, eps, decay))
        return True
    return False


def _gathered(name: str, p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, kept: int,
              scalars: list[Tensor], kernel: Any = None) -> None:
    """A GPU's compact step: the dense kernel over the gathered kept entries with an all-ones mask (each entry's
    arithmetic is the dense run's), then the weights scattered back."""
    keep = bitmask.unpack(packed, (p.numel(),))
    flat, size = p.view(-1), m.numel()
    values, grads = flat.new_zeros(size), g.new_zeros(size)
    values[:kept], grads[:kept] = flat[keep], g.reshape(-1)[keep]
    ones = torch.full((size // 8,), 255, dtype=torch.uint8, device=p.device)
    (kernel or torch_kernels.compiled(name))(values, grads, m, v, ones, *scalars)
    flat[keep] = values[:kept]


def mask_update_(w: Tensor, cut: float, packed: Tensor, zero: list[Tensor], score: Tensor | None = None) -> int | None:
    """One-pass mask update of ``w`` (lib/optim/kernels/native.py); None when no kernel takes these tensors."""
    tensors = [w, *zero] + ([score] if score is not None else [])
    if not native.fits(*tensors):
        return None
    return native.mask_update_(w, cut, packed, zero, score)
