"""Storage helpers shared by the baseline methods: checked fp16 casts and sparse value layouts.

Not a method: the registry imports this module like any other and finds nothing to register.
"""
from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..quant import pack_bits, unpack_bits

FP16_MAX = torch.finfo(torch.float16).max
#: above this many entries a flat index no longer fits int32, so sparse tensors always use the bit mask
_INT32_LIMIT = 2**31 - 1


def check_fp16_range(values: torch.Tensor, what: str, name: str = "") -> None:
    """Refuse values that an fp16 field cannot hold (they would decode to ±inf)."""
    if values.numel() and float(values.abs().max()) > FP16_MAX:
        raise NonFiniteError(f"{what} of {name or '<delta>'} exceeds the fp16 range (max |value| "
                             f"{float(values.abs().max()):.4g} > {FP16_MAX:.0f})")


def to_fp16(values: torch.Tensor, what: str, name: str = "") -> torch.Tensor:
    """Cast to fp16 after :func:`check_fp16_range`."""
    check_fp16_range(values, what, name)
    return values.to(torch.float16)


def encode_positions(keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Positions of the kept entries of a flat tensor, as a packed 1-bit mask or int32 indices.

    ``keep`` is a flat bool mask. The layout is whichever is smaller: a mask costs 1 bit per entry,
    indices 32 bits per kept entry.
    """
    count = int(keep.sum())
    if 32 * count < keep.numel() and keep.numel() <= _INT32_LIMIT:
        return {"index": torch.nonzero(keep).squeeze(1).to(torch.int32)}
    return {"mask": pack_bits(keep.to(torch.uint8), 1)}


def decode_positions(fields: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_positions`: the flat bool mask of kept entries."""
    if "index" in fields:
        index = fields["index"].long()
        keep = torch.zeros(numel, dtype=torch.bool, device=index.device)
        keep[index] = True
        return keep
    return unpack_bits(fields["mask"], 1, numel).bool()


def encode_sparse(keep: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The kept entries' ``values`` (in position order) and their positions (:func:`encode_positions`)."""
    return {"values": values, **encode_positions(keep)}


def decode_sparse(fields: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_sparse`: the dense flat float32 tensor, zeros where nothing was kept."""
    values = fields["values"].float()
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    out[decode_positions(fields, numel)] = values
    return out
