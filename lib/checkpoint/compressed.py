"""`make export SPARSE=compressed`: a pruned model stored as its kept values plus a bit-packed mask.

Every floating-point tensor with at least one zero entry is stored as two tensors, ``<name>.values`` (its
non-zero entries in row-major order, in the tensor's dtype) and ``<name>.mask`` (1 bit per entry,
lib/optim/bitmask.py's layout); every other tensor is stored whole. "Non-zero" is decided on the bits, so
a -0.0 is kept as a value and the loader restores every tensor bit for bit. A 90 %-sparse float32 weight
takes a tenth of its dense bytes plus 1/32 for the mask.

safetensors holds tensors only; the shapes and dtypes of the compressed tensors travel in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lib.core.errors import HarnessError
from lib.core.files import write_atomic
from lib.optim import bitmask

LAYOUT = "lib.checkpoint.compressed/1"
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float dtype's same-width integer view


def save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
         nm: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write ``state`` compressed to ``path``; return the card's facts (bytes dense and as stored, per tensor)."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, Any] = {}
    tied: dict[str, str] = {}  # a tensor that shares another's storage (GPT-2's head) is stored once
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    dense_bytes = 0
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().to("cpu").contiguous()
        dense_bytes += tensor.numel() * tensor.element_size()
        keep = _nonzero_bits(tensor)
        if keep is None or bool(keep.all()):
            tensors[name] = tensor.clone()
            continue
        shapes[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        positions = _nm_positions(keep, *nm) if nm else None
        if positions is not None:
            tensors[f"{name}.values"] = tensor.reshape(-1, nm[1]).gather(1, positions).reshape(-1).clone()
            tensors[f"{name}.index"] = _pack_index(positions, nm[1])
            shapes[name].update(layout="nm", n=nm[0], m=nm[1])
            continue
        tensors[f"{name}.values"] = tensor.reshape(-1)[keep.reshape(-1)].clone()
        tensors[f"{name}.mask"] = bitmask.pack(keep)
    info = {**(metadata or {}), "layout": LAYOUT, "compressed": json.dumps(shapes), "tied": json.dumps(tied)}
    write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), info))
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"layout": LAYOUT, "tensors_compressed": len(shapes), "bytes_dense": dense_bytes,
            "bytes_stored": stored, "size_ratio": stored / max(1, dense_bytes)}


def load(path: Path) -> dict[str, torch.Tensor]:
    """The dense state dict, bit for bit; one line (HarnessError) when the file is damaged or inconsistent."""
    try:
        with safe_open(str(path), "pt") as handle:
            info = handle.metadata() or {}
            stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise HarnessError(f"{path} cannot be read: {exc}") from None
    if info.get("layout") != LAYOUT:
        raise HarnessError(f"{path} is not a compressed export (layout {info.get('layout')!r}, not {LAYOUT!r})")
    shapes = json.loads(info.get("compressed", "{}"))
    state = {name: t for name, t in stored.items() if not name.endswith((".values", ".mask", ".index"))}
    for name, facts in shapes.items():
        shape = torch.Size(facts["shape"])
        if facts.get("layout") == "nm":
            state[name] = _load_nm(path, name, facts, stored.get(f"{name}.values"), stored.get(f"{name}.index"))
            continue
        values, packed = stored.get(f"{name}.values"), stored.get(f"{name}.mask")
        if values is None or packed is None or packed.numel() != bitmask.packed_size(shape.numel()):
            raise HarnessError(f"{path}: {name} lacks its values or its mask, or the mask is not {shape}'s size; "
                               f"nothing loaded")
        keep = bitmask.unpack(packed, shape)
        if int(keep.sum()) != values.numel():
            raise HarnessError(f"{path}: {name} has {values.numel()} values but its mask keeps {int(keep.sum())}; "
                               f"the file is damaged, nothing loaded")
        dense = torch.zeros(shape, dtype=getattr(torch, facts["dtype"]))
        dense.reshape(-1)[keep.reshape(-1)] = values
        state[name] = dense
    for name, source in json.loads(info.get("tied", "{}")).items():
        state[name] = state[source]
    return state


def _nonzero_bits(tensor: torch.Tensor) -> torch.Tensor | None:
    """Entries whose bits are not all zero (so -0.0 counts as a value); None for tensors not compressed."""
    if tensor.dtype == torch.int8:
        return tensor != 0 if tensor.numel() else None
    if not tensor.is_floating_point() or tensor.element_size() not in _INT or tensor.numel() == 0:
        return None
    return tensor.view(_INT[tensor.element_size()]) != 0


def _nm_positions(keep: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """(groups, n) positions of each group's kept entries (padded with its first zeros), or None when the
    tensor does not hold the pattern (not a matrix of rows that M divides, or a group with more than N)."""
    if keep.dim() < 2 or keep[0].numel() % m:
        return None
    groups = keep.reshape(-1, m)
    if bool((groups.sum(1) > n).any()):
        return None
    order = torch.argsort((~groups).to(torch.int8), dim=1, stable=True)  # kept first, then zeros, in order
    return order[:, :n].sort(dim=1).values


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def _pack_index(positions: torch.Tensor, m: int) -> torch.Tensor:
    bits = _index_bits(m)
    flat = positions.reshape(-1, 1)
    return bitmask.pack((flat >> torch.arange(bits)) & 1)


def _load_nm(path: Path, name: str, facts: dict[str, Any], values: torch.Tensor | None,
             packed: torch.Tensor | None) -> torch.Tensor:
    shape, n, m = torch.Size(facts["shape"]), int(facts["n"]), int(facts["m"])
    groups, bits = shape.numel() // m, _index_bits(m)
    if values is None or packed is None or values.numel() != groups * n or \
            packed.numel() != bitmask.packed_size(groups * n * bits):
        raise HarnessError(f"{path}: {name} has {0 if values is None else values.numel()} values or an index "
                           f"that is not {groups} groups x {n} of {shape}; the file is damaged, nothing loaded")
    unpacked = bitmask.unpack(packed, (groups * n, bits)).to(torch.int64)
    positions = (unpacked << torch.arange(bits)).sum(1).reshape(groups, n)
    dense = torch.zeros(groups, m, dtype=getattr(torch, facts["dtype"]))
    dense.scatter_(1, positions, values.reshape(groups, n))
    return dense.reshape(shape)
