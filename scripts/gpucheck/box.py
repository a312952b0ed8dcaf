"""Part 0: what the box has (GPU, driver, CUDA, torch, Triton, cuSPARSELt, a C compiler), and the
pre-flight that refuses, in one line, a machine with no GPU or a CPU build of torch beside a GPU."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpucheck import Context, result
from lib.core.provenance import device_name

NO_GPU_EXIT, CPU_TORCH_EXIT = 2, 3


def gpu_on_machine() -> str:
    """The GPUs the driver shows, whatever torch says ("" when none): nvidia-smi -L, else the driver's files."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=8).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        if listed.startswith("GPU"):
            return listed.splitlines()[0] + (f" (+{len(listed.splitlines()) - 1} more)" if "\n" in listed else "")
    driver = Path("/proc/driver/nvidia/gpus")
    if driver.is_dir() and any(driver.iterdir()):
        return f"{len(list(driver.iterdir()))} NVIDIA GPU(s) in /proc/driver/nvidia/gpus"
    return "an NVIDIA device node (/dev/nvidia0)" if Path("/dev/nvidia0").exists() else ""


def preflight(dry: bool) -> tuple[int, str] | None:
    """None when the check can run; else (exit status, the one line saying why and what to do)."""
    import torch

    if dry or torch.cuda.is_available():
        return None
    seen = gpu_on_machine()
    if seen and not (torch.version.cuda or torch.version.hip):
        return CPU_TORCH_EXIT, (f"error: {sys.executable} has torch {torch.__version__}, a CPU build, but this "
                                f"machine has a GPU ({seen}); run `make gpu-check PYTHON=/path/to/python3` with "
                                f"an interpreter whose torch is a CUDA build")
    if seen:
        return NO_GPU_EXIT, (f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPU here "
                             f"({seen}); check `nvidia-smi`, the driver and CUDA_VISIBLE_DEVICES")
    return NO_GPU_EXIT, ("error: no CUDA GPU here (torch.cuda.is_available() is False); `make gpu-check` needs one, "
                         "and `make gpu-check DRY=1` runs every part's set-up on the CPU instead")


def describe() -> dict[str, Any]:
    """The box in one dict (also the record's header)."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "interpreter": sys.executable, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, "triton": _version("triton"), "c_compiler": shutil.which("cc") or shutil.which("gcc") or None,
        "cpu": device_name("cpu"), "cpu_cores": len(os.sched_getaffinity(0)), "gpus": [],
    }
    cusparselt = getattr(torch.backends, "cusparselt", None)
    info["cusparselt"] = (cusparselt.version() if cusparselt and cusparselt.is_available() else None)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "total_gib": round(total / 2**30, 1),
                                 "free_gib": round(free / 2**30, 1),
                                 "capability": list(torch.cuda.get_device_capability(i)),
                                 "multiprocessors": props.multi_processor_count})
        info["driver"] = _driver()
    gpu = info["gpus"][0] if info["gpus"] else None
    info["device"] = (f"{gpu['name']} ({gpu['total_gib']} GiB, compute capability {gpu['capability'][0]}."
                      f"{gpu['capability'][1]})" if gpu else f"CPU: {info['cpu']}, {info['cpu_cores']} core(s)")
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=8).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def run(ctx: Context) -> dict:
    info = describe()
    rows = [["device", info["device"]], ["driver", info.get("driver") or "n/a"],
            ["CUDA (torch build)", info["cuda"] or "none (CPU build)"], ["torch", info["torch"]],
            ["Triton", info["triton"] or "not installed"], ["cuDNN", info["cudnn"] or "n/a"],
            ["cuSPARSELt", info["cusparselt"] or "not available"], ["C compiler", info["c_compiler"] or "none"],
            ["Python", f"{info['python']} ({info['interpreter']})"], ["CPU", f"{info['cpu']}, {info['cpu_cores']} "
                                                                              f"core(s)"]]
    return result("ok", "", info, rows)
