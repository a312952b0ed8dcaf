"""The bitter variants: importance of each weight from ``w``, Adam's ``m`` (exp_avg) and ``v`` (exp_avg_sq).

One table, ``BITTER``, maps a variant name to its score function
``fn(w, m, v, step, beta1) -> scores`` (same shape as ``w``, high = keep);
the formulas are in docs/algorithms.md,
"State pruning (bitter variants)". ``score_fn(variant, bitter8_form)`` picks
one (bitter8/bitter9 in the ``paper`` or ``knlp`` form) and ``importance``
applies it to a weight and its optimizer state, falling back to ``|w|`` for
a weight that has no state yet.

bitter8 (paper form) computes ``sqrt(|m_hat|)`` through float64 and rounds
once to float32. Why: torch's eager CPU ``sqrt`` is not correctly rounded
(it differs from the exact result in the last bit for ~20% of float32
inputs), while torch.compile's kernel is, so a float32 sqrt would make
bitter9 differ from bitter8. Via float64 both round the same true value to
float32 and agree bit for bit. Only mask updates pay for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lib.core.errors import ConfigError
from lib.core.registry import lookup

ScoreFn = Callable[[Tensor, Tensor, Tensor, int, float], Tensor]  # (w, m, v, step, beta1) -> scores
Kernel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (w, m, v, 1 - beta1^t) -> scores

EPS = 1e-8
LAYER_CAP = 0.95  # bitter4: no tensor is pruned beyond this


def _magnitude(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
    """bitter1 / bitter2: ``|w|``."""
    return w.abs()


def _bitter0(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
    """``|w*m| * |w| / (sqrt(v) + 1e-8)``: momentum times stability."""
    return (w * m).abs().mul_(w.abs()).div_(v.sqrt().add_(EPS))


def _bitter3(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
    """``|w| * sqrt(|m| + 1e-8)`` (also bitter4's score)."""
    return m.abs().add_(EPS).sqrt_().mul_(w.abs())


def _bitter5(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
    """``sign(w)*m / (sqrt(v)+1e-8) + 0.1*|w|``, as published (keeps the weights Adam is shrinking)."""
    return (torch.sign(w) * m).div_(v.sqrt().add_(EPS)).add_(w.abs().mul_(0.1))


def _bitter6(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
    """``|w| * sqrt(|m|+1e-8) * sqrt(m^2/(v+1e-8))``: magnitude, momentum and signal-to-noise."""
    snr = m.square().div_(v + EPS).sqrt_()
    return _bitter3(w, m, v, step, beta1).mul_(snr)


def _bitter7(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
    """``|w| * (|v| + 1e-8)^0.25``: the recommended variant."""
    return v.abs().add_(EPS).pow_(0.25).mul_(w.abs())


def _bitter8_paper_kernel(w: Tensor, m: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``|w| * sqrt(|m_hat|)``, ``m_hat = m / (1 - beta1^t)`` (the sqrt through float64, module docstring)."""
    m_hat = (m / bias).abs()
    return w.abs() * m_hat.double().sqrt().to(w.dtype)


def _bitter8_knlp_kernel(w: Tensor, m: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """The public code's bitter8: ``|w| * (|v| + 1e-5)^0.25`` in fp16, returned as ``w``'s dtype.

    Each fp16 operation is spelled out (compute wider, round to fp16 once) and
    the fourth root goes through float64 as two square roots, so eager and
    compiled code round the same values (module docstring).
    """
    shifted = (v.half().abs().float() + 1e-5).half()
    root = shifted.double().sqrt().sqrt().half()
    return (w.half().abs().float() * root.float()).half().to(w.dtype)


class _Compiled:
    """``kernel`` under torch.compile; eager ``kernel`` where compiling is unavailable or fails.

    Compiled lazily (the first mask update pays, not import). ``dynamic=True``
    keeps one graph for every tensor shape; the bias correction is a tensor
    argument, not a Python float, so a new step never recompiles.
    ``emulate_precision_casts`` makes fp16 intermediates round as eager does.
    """

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.compiled: Kernel | None = None
        self.failed = False

    def __call__(self, w: Tensor, m: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(
                        self.kernel, dynamic=True, options={"emulate_precision_casts": True}
                    )
                return self.compiled(w, m, v, bias)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager
                self.failed = True
                warnings.warn(f"bitter9: torch.compile unavailable ({exc!r:.200}); using eager bitter8", stacklevel=2)
        return self.kernel(w, m, v, bias)


def _bias_corrected(kernel: Kernel) -> ScoreFn:
    """A ScoreFn that hands ``kernel`` the bias correction ``1 - beta1^t`` as a 0-dim tensor."""

    def fn(w: Tensor, m: Tensor, v: Tensor, step: int, beta1: float) -> Tensor:
        bias = torch.tensor(1.0 - beta1 ** max(step, 1), dtype=m.dtype, device=m.device)
        return kernel(w, m, v, bias)

    return fn


BITTER8_FORMS: dict[str, Kernel] = {"paper": _bitter8_paper_kernel, "knlp": _bitter8_knlp_kernel}
_COMPILED: dict[str, _Compiled] = {form: _Compiled(kernel) for form, kernel in BITTER8_FORMS.items()}

BITTER: dict[str, ScoreFn] = {
    "bitter0": _bitter0,
    "bitter1": _magnitude,
    "bitter2": _magnitude,  # same score; the public runs only trained longer
    "bitter3": _bitter3,
    "bitter4": _bitter3,  # bitter3's score with per-layer targets (layer_sparsity)
    "bitter5": _bitter5,
    "bitter6": _bitter6,
    "bitter7": _bitter7,
    "bitter8": _bias_corrected(_bitter8_paper_kernel),
    "bitter9": _bias_corrected(_COMPILED["paper"]),
}
PER_LAYER = {"bitter4"}  # variants that prune each tensor to its own target


def score_fn(variant: str, bitter8_form: str = "paper") -> ScoreFn:
    """The score function of ``variant``; ``bitter8_form`` picks bitter8/bitter9's formula."""
    fn = lookup(BITTER, variant, "bitter variant (ADAMWPRUNE_VARIANT)", "lib/pruning/bitter.py")
    if bitter8_form not in BITTER8_FORMS:
        raise ConfigError(f"bitter8 form {bitter8_form!r} is unknown; valid: {', '.join(sorted(BITTER8_FORMS))}")
    if bitter8_form == "paper" or variant not in ("bitter8", "bitter9"):
        return fn
    kernel = BITTER8_FORMS[bitter8_form] if variant == "bitter8" else _COMPILED[bitter8_form]
    return _bias_corrected(kernel)


@torch.no_grad()
def importance(fn: ScoreFn, w: Tensor, state: Mapping[str, Any] | None, beta1: float) -> Tensor:
    """``fn``'s scores for weight ``w`` from its optimizer ``state``; ``|w|`` while it has no state yet."""
    w = w.detach()
    if not state or "exp_avg" not in state or "exp_avg_sq" not in state:
        return w.abs()
    step = state.get("step", 1)
    step = int(step.item()) if isinstance(step, Tensor) else int(step)
    return fn(w, state["exp_avg"], state["exp_avg_sq"], step, beta1)


def layer_sparsity(target: float, index: int, count: int) -> float:
    """bitter4: sparsity of the ``index``-th of ``count`` prunable tensors (model order), deeper = sparser.

    ``s_l = min(0.95, s * (0.7 + 0.6 * l / (L - 1)))``; with one tensor, ``s``.
    """
    if count <= 1:
        return target
    return min(LAYER_CAP, target * (0.7 + 0.6 * index / (count - 1)))
