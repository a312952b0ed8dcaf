"""The CPU kernels of masked_step.c: built once with the system C compiler, loaded with ctypes.

Why a hand-written kernel rather than torch.compile on the CPU: inductor turns the
masked step into one vectorized loop, but it widens the packed mask bytes 8 lanes at
a time through a partial load and ran 8.3x torch's fused AdamW at 124M weights on
this 2-core CPU (``inductor_over_dense`` in P2's detail, scripts/bench_parts_adamwprune.py),
while a loop that walks the mask a chunk at a time, plane by plane, is about as fast
as the fused step itself (row P2).

The library is built on first use into ``$XDG_CACHE_HOME/pruning-harness/kernels``
(``~/.cache`` by default), named by a hash of the source, the compiler, the flags and
the CPU's feature flags (``-march=native``), so a changed file or another CPU model
builds its own copy and concurrent runs never read a half-written one (tmp + rename).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("masked_step.c")
# -ffp-contract=off: no fused multiply-add, so the dense and the compact step (vectorized or not) agree to the bit.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", "-shared",
         "-fPIC", "-std=gnu11"]
_F, _I64, _I, _P = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "harness_masked_step_f32": ([_P, _P, _P, _P, _P, _I64, _I, _F, _I] + [_F] * 6 + [_I], None),
    "harness_mask_update_f32": ([_P, _F, _P, _P, _I, _P, _I64, _I], _I64),
    "harness_gather_blocks_f32": ([_P, _P, _I, _P, _I64, _P, _I], None),
    "harness_compact_step_f32": ([_P, _P, _P, _P, _P, _P, _I64, _I64, _I, _F, _I] + [_F] * 6 + [_I], None),
}


class KernelUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded here; the message says why in one line."""


def compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "pruning-harness" / "kernels"


def _build(cc: str) -> Path:
    """The shared library for this source, compiler and CPU, built if not cached yet."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + cc.encode() + " ".join(FLAGS).encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"masked_step-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise KernelUnavailable(f"{cc} could not build {SOURCE.name}: {detail}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") once built and loaded, else (None, the reason); either way decided once per process."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on the PATH"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except KernelUnavailable as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot build or load the kernels: {exc}"
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib, ""


def library() -> ctypes.CDLL:
    """The loaded kernels (built on first call); KernelUnavailable with the reason otherwise."""
    lib, reason = _load()
    if lib is None:
        raise KernelUnavailable(reason)
    return lib


def why_unavailable() -> str:
    """Empty when the kernels load here, else the one-line reason."""
    return _load()[1]


def fits(*tensors: Tensor) -> bool:
    """True when the kernels load here and can take these tensors: contiguous float32 on the CPU."""
    cpu_f32 = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    return cpu_f32 and not why_unavailable()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def masked_adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, *, decay: float, beta1: float,
                  beta2: float, step_size: float, bc2_sqrt: float, eps: float) -> None:
    """One masked AdamW update of ``p``, ``m``, ``v`` in place (torch's AdamW rule, pruned entries +0.0)."""
    library().harness_masked_step_f32(
        p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), packed.data_ptr(), p.numel(), 0, 0.0, 0,
        1.0 - beta1, beta2, 1.0 - beta2, -step_size * bc2_sqrt, eps * bc2_sqrt, decay, _threads())


def masked_spam_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, *, clip: bool, theta: float,
                 beta1: float, beta2: float, step: float, eps: float, decay: float) -> None:
    """One masked released-SPAM update of ``p``, ``m``, ``v`` in place (lib/optim/adamwspam.py)."""
    library().harness_masked_step_f32(
        p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), packed.data_ptr(), p.numel(), int(clip), theta, 1,
        1.0 - beta1, beta2, 1.0 - beta2, step, eps, decay, _threads())


def compact_adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, offsets: Tensor, chunk: int, *,
                   decay: float, beta1: float, beta2: float, step_size: float, bc2_sqrt: float, eps: float) -> None:
    """``masked_adamw_`` for the kept entries only: ``m`` and ``v`` hold just those, in flat order
    (lib/optim/compact.py; ``offsets``: kept entries before each plane's part of each ``chunk`` mask bytes)."""
    library().harness_compact_step_f32(
        p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), packed.data_ptr(), offsets.data_ptr(), p.numel(),
        chunk, 0, 0.0, 0, 1.0 - beta1, beta2, 1.0 - beta2, -step_size * bc2_sqrt, eps * bc2_sqrt, decay, _threads())


def compact_spam_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, packed: Tensor, offsets: Tensor, chunk: int, *,
                  clip: bool, theta: float, beta1: float, beta2: float, step: float, eps: float, decay: float) -> None:
    """``masked_spam_`` for the kept entries only (``compact_adamw_``)."""
    library().harness_compact_step_f32(
        p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), packed.data_ptr(), offsets.data_ptr(), p.numel(),
        chunk, int(clip), theta, 1, 1.0 - beta1, beta2, 1.0 - beta2, step, eps, decay, _threads())


def mask_update_(w: Tensor, cut: float, packed: Tensor, zero: list[Tensor], score: Tensor | None = None) -> int:
    """Keep ``score > cut`` (``|w|`` when None) where ``w != 0``: pack into ``packed``, zero the rest of ``w`` and
    ``zero``, in one pass. Returns the number kept."""
    pointers = (ctypes.c_void_p * max(1, len(zero)))(*[t.data_ptr() for t in zero])
    return int(library().harness_mask_update_f32(
        score.data_ptr() if score is not None else None, cut, w.data_ptr(), pointers, len(zero),
        packed.data_ptr(), w.numel(), _threads()))


def gather_blocks_(tensors: list[Tensor], picks: Tensor, counts: list[int], width: int, out: Tensor) -> bool:
    """Copy block ``picks[k]`` (``width`` entries) of each tensor, ``counts[t]`` picks per tensor in order, into
    ``out``; False (nothing done) unless every tensor is a whole number of blocks and the kernels take them all."""
    if not fits(out, *tensors) or any(t.numel() % width for t in tensors) or picks.dtype != torch.int64:
        return False
    bases = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * len(tensors))(*counts)
    library().harness_gather_blocks_f32(bases, sizes, len(tensors), picks.contiguous().data_ptr(), width,
                                        out.data_ptr(), _threads())
    return True
