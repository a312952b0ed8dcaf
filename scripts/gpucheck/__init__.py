"""`make gpu-check`'s parts: one prepared command that proves every GPU-only path of the harness.

Each part is a module of this package with ``run(ctx) -> dict`` and runs in its own
process (scripts/gpu_check.py --part KEY), so a part that hangs or crashes is killed
at its budget and the others go on. A part returns ``{"status": "ok" | "failed" |
"skipped", "reason": str, "results": {...}, "rows": [[label, value], ...]}``; the
runner (runner.py) adds "timeout" and writes gpu_check.json and gpu_check.md.

With ``ctx.dry`` (``make gpu-check DRY=1``, what CI runs) every part does its set-up
on the CPU on tiny shapes: the same code paths up to the device, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Part:
    """One part: its number in the issue's list, what it proves and its wall-clock budgets (seconds)."""

    key: str
    number: int
    title: str
    budget_s: int  # on one H100, compile warm-up counted; the budgets add up to 8 minutes
    dry_budget_s: int  # DRY=1 on a 2-core CPU (a limit, not an estimate)
    min_free_gib: float = 0.0  # skipped, with the figures, when the GPU has less free memory
    module: str = ""  # the module with run(ctx); default gpucheck.<key>

    @property
    def module_name(self) -> str:
        return self.module or f"gpucheck.{self.key}"


PARTS: tuple[Part, ...] = (
    Part("box", 0, "What the box has", 15, 30),
    Part("plan", 1, "make hwinfo and the plan for gpt2-finewebedu-bitter7", 35, 60),
    Part("train", 2, "GPT-2 124M: AdamWPrune bitter7 at 50 % against AdamW dense", 150, 90, 24.0),
    Part("steps", 3, "Fused masked AdamW/SPAM steps against fused AdamW; sampled vs exact threshold", 60, 60, 8.0),
    Part("sparse24", 4, "2:4 semi-structured kernels against dense; a sweep 2:4 row", 60, 60, 4.0),
    Part("actckpt", 5, "Activation checkpointing: measured bytes per policy against the estimates", 40, 60, 4.0),
    Part("resume", 6, "Exact resume on the device (deterministic algorithms, RNG included)", 60, 90, 2.0),
    Part("gputests", 7, "Tests marked gpu", 60, 60, 4.0),
)
BY_KEY = {p.key: p for p in PARTS}
TOTAL_BUDGET_S = sum(p.budget_s for p in PARTS)


@dataclass(frozen=True)
class Context:
    """What a part gets: DRY or not, its device, its own work folder and its budget."""

    dry: bool
    device: str  # "cuda" or "cpu" (DRY=1)
    work: Path
    budget_s: float


def result(status: str, reason: str = "", results: dict | None = None, rows: list | None = None) -> dict:
    """A part's answer (module docstring)."""
    return {"status": status, "reason": reason, "results": results or {}, "rows": rows or []}
