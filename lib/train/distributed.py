"""Which rank this process is, and the few collective operations the trainer needs.

A run with world_size > 1 is launched by torchrun (``launch_command``, used by
lib/matrix/__init__.py); every rank runs lib/train/run.py with RANK, WORLD_SIZE and LOCAL_RANK
in its environment, and ``setup`` joins the process group (NCCL on GPUs, gloo
on the CPU). With one process every function here is a cheap no-op, so
single-process code paths need no special cases. torch is imported only inside
the functions that use it. ``Shard`` itself is part of the task contract (lib/core/task.py).

The rules the ranks keep (issue #5, "Distributed"):
- data: rank r takes rows [r*micro, (r+1)*micro) of each global batch of the
  single-process stream at micro x world (``Shard.rows``); evaluation chunks are
  dealt round-robin (``Shard.chunks``) and their sums reduced (``reduce_sum``);
- pruning decisions are made on rank 0 and broadcast (``broadcast_masks``);
- only rank 0 writes results, checkpoints and tracking (``Shard.main``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib.core.errors import HarnessError
from lib.core.task import SINGLE, Shard  # the contract lives with the task interface; re-exported here

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lib.core.spec import HardwarePlan
    from lib.pruning.base import Pruner




def from_env() -> Shard:
    """The shard torchrun describes in this process's environment (SINGLE outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Shard(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


# -- launching and joining ----------------------------------------------------------------------


def single_process_command(run_dir: Path | str) -> list[str]:
    """``python -m lib.train.run RUN_DIR``: one run in one process."""
    return [sys.executable, "-m", "lib.train.run", str(run_dir)]


def run_command(run_dir: Path | str) -> list[str]:
    """The command for the run in ``run_dir`` as its spec.json plans it; a single process when the spec
    cannot be read (lib.train.run then says what is wrong with it, in the run's log and record)."""
    from lib.core.spec import RunSpec

    try:
        return launch_command(RunSpec.read(Path(run_dir) / "spec.json").hardware, run_dir)
    except HarnessError:
        return single_process_command(run_dir)


def launch_command(hw: HardwarePlan, run_dir: Path | str) -> list[str]:
    """The command that runs ``run_dir``: lib.train.run itself for one process, else under torchrun."""
    if hw.world_size <= 1:
        return single_process_command(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if hw.nnodes > 1:
        cmd += [f"--nnodes={hw.nnodes}", f"--node_rank={hw.node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={hw.rdzv_endpoint}", f"--rdzv_id={hw.rdzv_id}"]
    else:
        cmd += ["--standalone"]  # a private rendezvous on a free local port: parallel runs never collide
    return cmd + [f"--nproc_per_node={hw.nproc_per_node}", *single_process_command(run_dir)[1:]]


def setup(hw: HardwarePlan) -> Shard:
    """Join the run's process group (when torchrun started several ranks); HarnessError if the plan cannot run."""
    shard = from_env()
    if shard.world_size != hw.world_size:
        raise HarnessError(f"this run is planned for {hw.world_size} process(es) but was started as "
                           f"{shard.world_size}; start it with `make continue` (torchrun when more than one)")
    check_devices(hw.device, int(os.environ.get("LOCAL_WORLD_SIZE", shard.local_rank + 1)))
    if shard.world_size == 1:
        return shard
    import torch
    import torch.distributed as dist

    if hw.device == "cuda":
        torch.cuda.set_device(shard.local_rank)
    dist.init_process_group(backend=hw.backend or ("nccl" if hw.device == "cuda" else "gloo"))
    return shard


def check_devices(kind: str, ranks_here: int = 1) -> None:
    """One clear line when the planned device is gone or this machine has fewer GPUs than ranks."""
    if kind != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise HarnessError("the plan says CUDA but torch sees no GPU now; re-plan with `make dry-run`")
    found = torch.cuda.device_count()
    if ranks_here > found:
        raise HarnessError(f"{ranks_here} ranks on this machine but torch sees {found} GPU(s) now; re-plan with "
                           f"`make dry-run` (it sizes the run to the GPUs present, see CUDA_VISIBLE_DEVICES)")


def device(kind: str, shard: Shard = SINGLE) -> torch.device:
    """The torch device of this rank: ``cuda:<local rank>`` for several GPU ranks."""
    import torch

    check_devices(kind)
    if kind == "cuda" and shard.world_size > 1:
        return torch.device("cuda", shard.local_rank)
    return torch.device(kind)


def teardown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(shard: Shard) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. preparing data files) while the others wait, then they run it."""
    if not shard.main:
        barrier()
    try:
        yield
    finally:
        if shard.main:
            barrier()  # even on failure, so the others go on and fail with the same clear error


# -- the model and its masks --------------------------------------------------------------------


def wrap(model: nn.Module, shard: Shard, where: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several ranks; the model itself otherwise, and
    when it is sharded already (FSDP2, lib/train/sharding.py: every rank built the same weights from the seed)."""
    if shard.world_size == 1 or hasattr(model, "set_requires_gradient_sync"):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[where.index] if where.type == "cuda" else None)


def no_sync_unless(wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce (FSDP2's reduce-scatter) on every accumulation micro-step but the last."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2 (lib/train/sharding.py): a switch, not a context
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def broadcast_masks(pruner: Pruner) -> None:
    """Rank 0's masks on every rank, re-applied to weights and optimizer state: decisions made once."""
    if not _active():
        return
    import torch
    import torch.distributed as dist

    for name, _ in pruner.params:
        mask = pruner.masks.get(name)
        if mask is not None:  # in place: a state pruner's masks are the optimizer's own tensors
            dist.broadcast(mask.view(torch.uint8) if mask.dtype == torch.bool else mask, src=0)
    pruner.apply_masks()


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (e.g. the best checkpoint rank 0 read from disk)."""
    if not _active():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def mask_digest(pruner: Pruner) -> str:
    """sha256 of every keep-mask in prunable order, as stored (bool or packed): equal digests, equal masks."""
    import torch

    digest = hashlib.sha256()
    for name, _ in pruner.params:
        mask = pruner.masks.get(name)
        if mask is not None:  # sharded (FSDP2): this rank's shard of it
            digest.update(name.encode())
            digest.update(mask.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- reductions ---------------------------------------------------------------------------------


def reduce_sum(*values: float) -> tuple[float, ...]:
    """The sums over ranks of ``values`` (each rank passes its own), in float64."""
    return tuple(_all_reduce(values, "SUM")) if _active() else tuple(values)


def reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (e.g. the slowest rank's step time)."""
    return _all_reduce((value,), "MAX")[0] if _active() else value


def reduce_min_int(value: int) -> int:
    """The smallest ``value`` over ranks (e.g. the micro-batch every rank's memory holds)."""
    return int(_all_reduce((value,), "MIN")[0]) if _active() else value


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank; [obj] with one process)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def backend() -> str:
    """The backend of the process group ("nccl" or "gloo"); "" without one."""
    if not _active():
        return ""
    import torch.distributed as dist

    return str(dist.get_backend())


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        import torch.distributed as dist

        dist.barrier()


def _active() -> bool:
    """True inside a process group of several ranks; without one every collective here is a no-op."""
    if "torch.distributed" not in sys.modules:  # never joined one (and no need to import torch to know)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: tuple[float, ...], op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    # NCCL reduces only tensors on this rank's GPU, gloo only CPU tensors
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()
