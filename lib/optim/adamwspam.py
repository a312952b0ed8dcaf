"""``adamwspam``: AdamW with SPAM's spike-aware mechanics (Huang et al., arXiv 2501.06842).

Two forms. ``released`` (the default) is the authors' released optimizer, rule for
rule (checked step by step against pytorch-optimizer's port in tests/optim/test_spam_oracle.py):

- ``t`` counts steps from 1; every ``interval`` steps (``t % interval == 0``) both
  moments are zeroed, but the bias-correction step count keeps counting;
- clipping only when ``t >= accu`` and ``t % interval >= accu`` (``accu`` = 20 by
  default); where ``g^2 > theta * v_prev`` the gradient becomes
  ``sign(g) * sqrt(theta * v_prev)``, also where ``v_prev == 0`` (then 0);
- ``p -= lr * sqrt(1 - beta2^s) / (1 - beta1^s) * factor * m / (sqrt(v) + eps)``, then
  decoupled decay on the updated weights, ``p *= 1 - lr * wd``;
- ``factor = 1 - 0.99 * (1 + cos(pi * k / (N + 1))) / 2`` for the ``k = 0..N-1``
  steps from a reset (``k = 0`` at the reset step), 1 otherwise and before the first
  reset.

``knlp`` is the predecessor's public AdamWPrune code. Each step ``t`` (counted once
per ``step()`` call; that code advances its SPAM step counter twice per step, a slip not
reproduced here):

1. A gradient-norm z-score detector. If the global grad norm is more than 2
   sample standard deviations above the mean of the last 100 norms, soft-reset
   every moment (``m *= 0.5``, ``v *= 0.9``) before the update.
2. Every ``interval`` steps (``t % interval == 0``; 0 = never) ``exp_avg`` and
   ``exp_avg_sq`` are zeroed and each parameter's bias-correction counter
   ``state["step"]`` restarts, so step ``t`` is again step 1.
3. Spike clipping, compared against ``v_prev`` = ``exp_avg_sq`` before this
   step's update (after 1 and 2): where ``g^2 > theta * v_prev`` the gradient
   becomes ``sign(g) * sqrt(theta * v_prev)``. Skipped during the warm-up window
   after a reset, and elementwise wherever ``v_prev == 0`` (the first step, right
   after a reset, and entries that have never had a gradient such as unused
   embedding rows, which the literal rule would clip to 0 forever).
4. AdamW update. The Adam step is scaled by ``0.5 * (1 - cos(pi * k / N))`` for
   the ``k = 1..N`` steps from a reset (the reset step is ``k = 1``); 1 otherwise,
   including at the start of training, where the trainer's LR warm-up already
   applies. The decoupled decay ``w -= lr * wd * w`` is not scaled by the factor:
   the reset makes the moments unreliable, not the weights.

There is no ``paper`` form. Issue 12 keeps one only for rules shown, by quoting the
paper's Algorithm 1, to differ from the released code; Algorithm 1's text could not be
reached offline, so no rule could be shown to differ, and the form (steps 2-4 above
without step 1) was removed.

Weights whose gradient, ``exp_avg`` and ``exp_avg_sq`` are all zero (pruned by a
gradient mask) stay exactly zero: ``0 / (sqrt(0) + eps) = 0`` and decay of 0 is 0.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lib.core.spec import OptimSettings
from lib.optim.groups import adam_kwargs

FORMS = ("released", "knlp")
RELEASED_DEATH_RATE = 0.99  # released warm-up: the step starts at 1 - 0.99 of itself after a reset
ZSCORE_WINDOW = 100  # knlp: how many recent global grad norms the detector remembers
ZSCORE_THRESHOLD = 2.0  # knlp: a norm more than this many std above the mean is a spike
SOFT_RESET_M, SOFT_RESET_V = 0.5, 0.9  # knlp: factors applied to exp_avg / exp_avg_sq on a spike


def warmup_factor(k: int, n: int) -> float:
    """Cosine warm-up of the step at the ``k``-th step after a reset (``k`` from 1) over ``n`` steps."""
    if n <= 0 or k >= n:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * k / n))


def released_warmup_factor(k: int, n: int) -> float:
    """The released code's warm-up at the ``k``-th step from a reset (``k = 0`` at the reset step) over ``n``."""
    if k >= n:
        return 1.0
    return 1.0 - RELEASED_DEATH_RATE * (1.0 + math.cos(math.pi * k / (n + 1))) / 2.0


def clip_spikes(grad: torch.Tensor, exp_avg_sq: torch.Tensor, theta: float) -> torch.Tensor:
    """``grad`` with entries where ``grad^2 > theta * v`` (and ``v > 0``) set to ``sign(grad) * sqrt(theta * v)``."""
    bound = exp_avg_sq * theta
    spike = (grad * grad > bound) & (exp_avg_sq > 0)
    return torch.where(spike, grad.sign() * bound.sqrt_(), grad)


class AdamWSPAM(torch.optim.Optimizer):
    """AdamW plus SPAM spike clipping, periodic moment resets and post-reset warm-up (module docstring).

    Per-parameter state: ``step`` (int, steps since the last reset), ``exp_avg``,
    ``exp_avg_sq``. The reset clock is global (all groups reset together) and
    travels in ``state_dict()["spam"]``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        theta: float = 5000.0,
        interval: int = 500,
        warmup: int = 150,
        clip: bool = True,
        form: str = "released",
        accu: int = 20,
    ) -> None:
        if not lr >= 0 or not eps > 0 or not weight_decay >= 0:
            raise ValueError(f"Invalid lr/eps/weight_decay: {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (each in [0, 1))")
        if not theta > 0 or interval < 0 or warmup < 0 or accu < 0:
            raise ValueError(f"Invalid SPAM theta/interval/warmup/accu: {theta}, {interval}, {warmup}, {accu}")
        if form not in FORMS:
            raise ValueError(f"Invalid SPAM form: {form!r} (one of {', '.join(FORMS)})")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.theta, self.interval, self.warmup, self.clip, self.form = theta, interval, warmup, clip, form
        self.accu = accu
        self.spam_step = 0  # steps taken, counted once per step()
        self.last_reset = 0  # step of the latest moment reset; 0 = none yet
        self.soft_resets = 0  # knlp: how many times the z-score detector fired
        self.norm_history: deque[float] = deque(maxlen=ZSCORE_WINDOW)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SPAM/AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.spam_step += 1
        t = self.spam_step
        reset = self.interval > 0 and t % self.interval == 0
        if reset:
            self.last_reset = t
        if self.form == "released":
            self._step_released(t, reset)
            return loss
        k = t - self.last_reset + 1 if self.last_reset else 0  # 0: no reset yet
        in_warmup = 0 < k <= self.warmup
        factor = warmup_factor(k, self.warmup) if k else 1.0
        if self.form == "knlp":
            self._soft_reset_on_norm_spike()
        for group in self.param_groups:
            self._step_group(group, reset, self.clip and not in_warmup, factor)
        return loss

    def _step_group(self, group: dict[str, Any], reset: bool, clip: bool, factor: float) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = self._collect(group, reset, restart_steps=True)
        if not params:
            return
        if clip:
            # Per tensor rather than foreach: the temporaries then live one tensor at a time.
            grads = [clip_spikes(g, v, self.theta) for g, v in zip(grads, exp_avg_sqs, strict=True)]
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        # Same operation order as torch's AdamW: decay, moments, bias-corrected step.
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**s) for s in steps])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr * factor / (1.0 - beta1**s) for s in steps])

    def _step_released(self, t: int, reset: bool) -> None:
        """One step of the released optimizer (module docstring)."""
        factor, clip = self.released_schedule(t)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._collect(group, reset, restart_steps=False)
            if not params:
                continue
            if clip:
                bounds = torch._foreach_mul(exp_avg_sqs, self.theta)
                grads = [torch.where(g * g > b, g.sign() * b.sqrt(), g) for g, b in zip(grads, bounds, strict=True)]
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denom, group["eps"])
            sizes = [-lr * math.sqrt(1.0 - beta2**s) / (1.0 - beta1**s) * factor for s in steps]
            torch._foreach_addcdiv_(params, exp_avgs, denom, sizes)
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)  # after the update, on the updated weights

    def released_schedule(self, t: int) -> tuple[float, bool]:
        """(warm-up factor, clip?) of the released form at step ``t``, after that step's reset bookkeeping."""
        factor = released_warmup_factor(t - self.last_reset, self.warmup) if self.last_reset else 1.0
        clip = self.clip and t >= self.accu and (self.interval == 0 or t % self.interval >= self.accu)
        return factor, clip

    def _collect(self, group: dict[str, Any], reset: bool, restart_steps: bool) -> tuple[list, ...]:
        """Zero the moments on a reset (and restart the step counts if asked); the tensors of this step."""
        states = [self.state[p] for p in group["params"] if p in self.state] if reset else []
        if states:  # foreach ops refuse empty lists (a reset on the very first step has nothing to zero)
            torch._foreach_zero_([s["exp_avg"] for s in states] + [s["exp_avg_sq"] for s in states])
            if restart_steps:
                for s in states:
                    s["step"] = 0
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamWSPAM does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    def _soft_reset_on_norm_spike(self) -> None:
        """knlp detector: soft-reset all moments when the global grad norm's z-score exceeds the threshold."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        device = grads[0].device
        norms = [n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(grads)]
        norm = float(torch.linalg.vector_norm(torch.stack(norms)))  # one host sync per step, knlp form only
        history = self.norm_history
        if len(history) >= 2:
            mean, std = statistics.fmean(history), statistics.stdev(history)
            if std > 0 and (norm - mean) / std > ZSCORE_THRESHOLD:
                self.soft_resets += 1
                states = [s for s in self.state.values() if "exp_avg" in s]
                if states:
                    torch._foreach_mul_([s["exp_avg"] for s in states], SOFT_RESET_M)
                    torch._foreach_mul_([s["exp_avg_sq"] for s in states], SOFT_RESET_V)
        if math.isfinite(norm):  # an inf/nan norm would poison mean and std for the whole window
            history.append(norm)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus the global SPAM clock under ``"spam"``."""
        state = super().state_dict()
        state["spam"] = {
            "step": self.spam_step,
            "last_reset": self.last_reset,
            "soft_resets": self.soft_resets,
            "norm_history": list(self.norm_history),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; a dict without ``"spam"`` starts the clock at 0."""
        state_dict = dict(state_dict)
        spam = state_dict.pop("spam", {})
        super().load_state_dict(state_dict)
        self.spam_step = int(spam.get("step", 0))
        self.last_reset = int(spam.get("last_reset", 0))
        self.soft_resets = int(spam.get("soft_resets", 0))
        self.norm_history = deque(spam.get("norm_history", []), maxlen=ZSCORE_WINDOW)


def build(model: nn.Module, settings: OptimSettings, **options: Any) -> torch.optim.Optimizer:
    """AdamWSPAM over ``model``'s parameter groups, with the SPAM settings from ``settings``."""
    if options:
        # Not torch's class, so torch's fused/foreach switches do not apply; refuse rather than ignore them.
        raise ValueError(f"takes no implementation options (got {', '.join(sorted(options))})")
    return AdamWSPAM(
        **adam_kwargs(model, settings),
        theta=settings.spam_theta,
        interval=settings.spam_interval,
        warmup=settings.spam_warmup,
        clip=settings.spam_clip,
        form=settings.spam_form,
        accu=settings.spam_accu,
    )
