"""Bit-packed keep-masks: 1 bit per weight, ``ceil(n / 8)`` bytes of uint8.

Layout (bit-planes): for a tensor of ``n`` entries and ``M = ceil(n / 8)``
bytes, entry ``i`` is bit ``i // M`` of byte ``i % M``. So bit ``j`` of every
byte describes one contiguous block ``[j*M, (j+1)*M)`` of the flattened tensor.

Why planes rather than 8 neighbouring entries per byte: applying the mask every
step must turn bits into per-entry masks. With planes, one shift over the packed
bytes yields a whole block at once, and 8 bytes can be processed as one int64
(no gather); with the neighbouring layout each byte fans out to 8 entries, which
torch can only express as a table gather, several times slower on CPU.

``apply_`` zeroes the pruned entries of a float tensor in place by AND-ing its
bits with an all-ones / all-zeros integer mask, which yields exactly ``+0.0``
(even for a NaN or inf gradient) and works on CPU and GPU alike. It expands the
mask one chunk at a time, so its temporaries stay cache-sized whatever the
tensor size.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 1 << 16  # CPU: packed bytes expanded per chunk (512K entries, a 2 MiB int32 temporary: L2-sized)
GPU_CHUNK_BYTES = 1 << 21  # GPUs: few, large chunks (16M entries, 64 MiB) since each op is a kernel launch
_LOW_BITS = 0x0101010101010101  # bit 0 of each of the 8 bytes of an int64
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer view of a float dtype


def packed_size(numel: int) -> int:
    """Bytes of a packed mask for ``numel`` entries."""
    return (numel + 7) // 8


def pack(mask: Tensor) -> Tensor:
    """Pack a bool keep-mask (any shape) into ``packed_size(mask.numel())`` uint8 bytes."""
    flat = mask.reshape(-1).to(torch.bool)
    n = flat.numel()
    m = packed_size(n)
    if 8 * m != n:  # pad the last plane with "pruned" bits; unpack/apply_ never read them
        flat = torch.cat([flat, flat.new_zeros(8 * m - n)])
    planes = flat.view(torch.uint8).view(8, m)
    packed = planes[0].clone()
    for j in range(1, 8):
        packed.bitwise_or_(planes[j] << j)
    return packed


def unpack(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The bool keep-mask of ``shape`` that ``pack`` turned into ``packed``."""
    n = 1
    for size in shape:
        n *= size
    m = packed.numel()
    if m != packed_size(n):
        raise ValueError(f"packed mask has {m} bytes; shape {tuple(shape)} needs {packed_size(n)}")
    out = torch.empty(8 * m, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        torch.bitwise_right_shift(packed, j, out=out[j * m : (j + 1) * m])
    out.bitwise_and_(1)
    return out[:n].view(torch.bool).view(shape)


def _fast_path(tensor: Tensor, packed: Tensor) -> bool:
    """True when ``apply_`` can use whole-plane integer views (the common case for weight matrices)."""
    return (
        tensor.is_contiguous()
        and tensor.element_size() in _INT_VIEW
        and tensor.numel() % 64 == 0  # planes of a whole number of int64 words
        and packed.is_contiguous()
        and packed.storage_offset() % 8 == 0
    )


@torch.no_grad()
def apply_(tensor: Tensor, packed: Tensor, chunk: int | None = None) -> Tensor:
    """Zero, in place, the entries of ``tensor`` whose bit in ``packed`` is 0; returns ``tensor``.

    ``chunk``: packed bytes expanded at a time (default: by device, see the constants).
    """
    n, m = tensor.numel(), packed.numel()
    if m != packed_size(n):
        raise ValueError(f"packed mask has {m} bytes; a tensor of {n} entries needs {packed_size(n)}")
    if not _fast_path(tensor, packed):
        # Odd sizes, strided or unusual dtypes: expand the whole mask once (correct, not fast).
        return tensor.masked_fill_(~unpack(packed, tensor.shape), 0)
    if chunk is None:
        chunk = CHUNK_BYTES if tensor.device.type == "cpu" else GPU_CHUNK_BYTES
    chunk = max(8, chunk - chunk % 8)  # whole int64 words
    ints = _INT_VIEW[tensor.element_size()]
    rows = tensor.view(-1).view(ints).view(8, m)  # row j = the entries bit j describes
    words = packed.view(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device).view(8, 1)
    bits64 = torch.empty(8, min(chunk, m) // 8, dtype=torch.int64, device=packed.device)
    keep = torch.empty(8, min(chunk, m), dtype=ints, device=packed.device)
    for start in range(0, m, chunk):
        width = min(chunk, m - start)
        b64 = bits64[:, : width // 8]
        # All 8 planes at once: shift bit j of each byte to bit 0, keep only that bit (0 or 1 per byte).
        torch.bitwise_right_shift(words[start // 8 : (start + width) // 8].view(1, -1), shifts, out=b64)
        b64.bitwise_and_(_LOW_BITS)
        b8 = b64.view(torch.int8)  # (8, width): 0 or 1 per entry
        b8.neg_()  # 0 or -1, i.e. all bits set
        k = keep[:, :width]
        k.copy_(b8)  # sign-extends to the tensor's width
        rows[:, start : start + width].bitwise_and_(k)
    return tensor
