"""What made a run: the code, the software, the machine and the data, recorded in its summary.json.

``record(spec, world_size)`` is called once per run by lib/train/run.py. The data part is the task's own
fingerprint (``data_fingerprint(spec)`` of the task plug-in: the split contents of an image set, the token
files of a language-model set); a task without one says so instead of guessing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from lib.core.pyenv import ROOT, pins


@functools.cache
def code_state() -> dict[str, Any]:
    """The git commit of the project and whether its tracked files had uncommitted changes (None without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


@functools.cache
def versions() -> dict[str, str | None]:
    """python, torch, numpy and every pinned dependency as installed (None for one that is not)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ["numpy", *sorted(pins())]:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def device_name(device_type: str) -> str:
    """The GPU's name, or the CPU's model."""
    if device_type.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(spec: Any, world_size: int) -> dict[str, Any]:
    """The provenance entry of one run's summary.json."""
    from lib.core.task import get_task

    try:  # never raises: a failed run (an unknown model, missing data) still records the rest
        task = get_task(spec.model)
        data = task.data_fingerprint(spec) if hasattr(task, "data_fingerprint") else {
            "note": f"the {spec.model} task records no data fingerprint"}
    except Exception as exc:  # noqa: BLE001
        data = {"error": f"{type(exc).__name__}: {exc}"}
    return {**code_state(), "versions": versions(), "device": device_name(spec.hardware.device),
            "threads": torch.get_num_threads(), "world_size": world_size, "data": data}


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 over the bytes of ``tensors`` (on the CPU, contiguous), with their shapes and dtypes."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
