"""Part 1: `make hwinfo` and the plan for gpt2-finewebedu-bitter7 on the real device.

The plan is made from a temporary config file written from the defconfig (never the
user's .config), by the same `python -m lib.cli hwinfo` that `make hwinfo` runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpucheck import ROOT, Context, result

DEFCONFIG = "gpt2-finewebedu-bitter7"


def temp_config(folder: Path, defconfig: str, changes: dict[str, str], drop: tuple[str, ...] = ()) -> Path:
    """``defconfigs/<defconfig>`` with ``changes`` (symbol -> value, CONFIG_ prefix included), and without its
    lines for the symbols in ``drop``, resolved into ``folder``/.config by the defconfig writer."""
    from kconfig_tool import write_defconfig

    folder.mkdir(parents=True, exist_ok=True)
    kept = [line for line in (ROOT / "defconfigs" / defconfig).read_text().splitlines()
            if line.split("=", 1)[0] not in (*changes, *drop)]
    source = folder / "defconfig"
    source.write_text("\n".join(kept + [f"{k}={v}" for k, v in changes.items()]) + "\n")
    target = folder / ".config"
    write_defconfig(source, target, str(source))
    return target


def hwinfo(config: Path, timeout: float) -> subprocess.CompletedProcess:
    """`make hwinfo` on ``config``: the detected devices and each run's plan with its rationale."""
    return subprocess.run([sys.executable, "-m", "lib.cli", "--config", str(config), "hwinfo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HARNESS_COMMAND": "make hwinfo (gpu-check)"})


def run(ctx: Context) -> dict:
    config = temp_config(ctx.work, DEFCONFIG, {})
    done = hwinfo(config, max(5.0, ctx.budget_s - 5))
    (ctx.work / "hwinfo.txt").write_text(done.stdout + done.stderr)
    if done.returncode:
        return result("failed", f"hwinfo exit {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    lines = done.stdout.splitlines()
    plan = [line.strip() for line in lines if "accum" in line and "rank" in line]
    devices = [line.strip() for line in lines if line.startswith(("GPU ", "CPU:"))]
    rows = [["detected", "; ".join(devices)], ["plan", plan[0] if plan else "(no plan line)"]]
    return result("ok", "", {"devices": devices, "plan": plan, "output": done.stdout}, rows)
