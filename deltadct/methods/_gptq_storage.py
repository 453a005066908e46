"""File layout of GPTQ-quantised matrices, shared by the calibrated methods (``delta_come``, ``deltazip``).

A method writes two fields whatever the number of matrices it quantises: ``codes`` (uint8, every
packed bit stream one after the other) and ``scales`` (fp16, every scale one after the other). The
order and size of each piece follow from the shape and the config, so the reader cuts them back out
in the same order; two fields instead of a few per matrix keep the file's tensor index (which
counts towards the measured size) small.

One R×C matrix quantised at ``bits`` with G column groups is, in ``codes``: its codes (row-major),
its R·G integer zero points at ``bits`` bits and, only when act-order made the groups other than
runs of consecutive columns, each column's group at ⌈log2 G⌉ bits; in ``scales``: its R·G scales.
Not a method: the registry imports this module like any other and finds nothing to register.
"""
from __future__ import annotations

import math

import torch

from ..gptq import GPTQResult, dequantize_asymmetric
from ..quant import pack_bits, packed_size, unpack_bits
from ._storage import to_fp16
from .base import ConfigError


def num_groups(cols: int, group_size: int) -> int:
    """Column groups of a row: ⌈C / group_size⌉, or 1 for group_size 0 (one grid per row)."""
    return math.ceil(cols / group_size) if group_size > 0 else 1


def group_index_bits(groups: int) -> int:
    return max(1, math.ceil(math.log2(groups)))


def stores_group_index(cols: int, group_size: int, act_order: bool) -> bool:
    """Whether the group of each column must be stored (act-order with more than one group)."""
    return act_order and num_groups(cols, group_size) > 1


def group_index_bytes(cols: int, group_size: int) -> int:
    return packed_size(cols, group_index_bits(num_groups(cols, group_size)))


def gptq_bytes(rows: int, cols: int, bits: int, group_size: int, *, with_codes: bool = True) -> int:
    """Bytes one matrix adds to ``codes`` and ``scales``, without its column groups."""
    groups = rows * num_groups(cols, group_size)
    return (packed_size(rows * cols, bits) if with_codes else 0) + packed_size(groups, bits) + 2 * groups


def check_hessian(hessian: torch.Tensor | None, cols: int, method: str, name: str) -> torch.Tensor:
    """The Hessian for a matrix with ``cols`` input features, or a ConfigError saying what is missing."""
    where = f"tensor {name!r}" if name else "this tensor"
    if hessian is None:
        raise ConfigError(f"method {method!r} needs calibration data (the Hessian of {where}'s layer inputs): "
                          "pass calibration={name: Hessian} to deltadct.compress, or run deltadct-run with "
                          "calibration=task")
    if tuple(hessian.shape) != (cols, cols):
        raise ConfigError(f"the calibration Hessian of {where} has shape {list(hessian.shape)}, expected "
                          f"[{cols}, {cols}] (one row and column per input feature)")
    if not torch.isfinite(hessian).all():
        raise ConfigError(f"the calibration Hessian of {where} has NaN/Inf entries")
    return hessian.float()


class StreamWriter:
    """Collects packed streams and fp16 values in order; :meth:`fields` gives ``codes`` and ``scales``."""

    def __init__(self, name: str = ""):
        self._name = name
        self._bytes: list[torch.Tensor] = []
        self._halves: list[torch.Tensor] = []

    def packed(self, codes: torch.Tensor, bits: int) -> None:
        self._bytes.append(pack_bits(codes.to(torch.uint8), bits))

    def fp16(self, values: torch.Tensor, what: str) -> None:
        self._halves.append(to_fp16(values.reshape(-1), what, self._name))

    def gptq(self, result: GPTQResult, bits: int, *, codes: bool = True) -> None:
        """A matrix's codes (unless the caller stores them its own way), zero points and scales."""
        if codes:
            self.packed(result.codes, bits)
        self.packed(result.zero, bits)
        self.fp16(result.scale, "a GPTQ group scale")

    def group_index(self, result: GPTQResult) -> None:
        groups = result.scale.shape[1]
        if group_index_bits(groups) > 8:
            raise ConfigError(f"{groups} column groups need more than 8 bits per group index; use a larger "
                              "group_size or act_order=false")
        self.packed(result.group_index, group_index_bits(groups))

    def fields(self) -> dict[str, torch.Tensor]:
        device = (self._bytes or self._halves)[0].device
        return {"codes": torch.cat(self._bytes) if self._bytes else torch.zeros(0, dtype=torch.uint8, device=device),
                "scales": torch.cat(self._halves) if self._halves else
                torch.zeros(0, dtype=torch.float16, device=device)}


class StreamReader:
    """Reads back what a :class:`StreamWriter` wrote, piece by piece in the same order."""

    def __init__(self, fields: dict[str, torch.Tensor]):
        self._bytes, self._halves = fields["codes"], fields["scales"]
        self._pos = self._half_pos = 0
        self.device = self._bytes.device

    def packed(self, count: int, bits: int) -> torch.Tensor:
        size = packed_size(count, bits)
        out = unpack_bits(self._bytes[self._pos:self._pos + size], bits, count)
        self._pos += size
        return out

    def fp16(self, count: int) -> torch.Tensor:
        out = self._halves[self._half_pos:self._half_pos + count].float()
        self._half_pos += count
        return out

    def group_index(self, cols: int, group_size: int) -> torch.Tensor:
        return self.packed(cols, group_index_bits(num_groups(cols, group_size))).long()

    def grid(self, rows: int, cols: int, bits: int, group_size: int, group_index: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry scale and zero point (R, C) of the next matrix; ``group_index`` None: natural groups."""
        groups = num_groups(cols, group_size)
        zero = self.packed(rows * groups, bits).reshape(rows, groups).float()
        scale = self.fp16(rows * groups).reshape(rows, groups)
        if group_index is None:
            group_index = (torch.arange(cols, device=self.device) // group_size if group_size > 0
                           else torch.zeros(cols, dtype=torch.long, device=self.device))
        return scale[:, group_index], zero[:, group_index]

    def gptq(self, rows: int, cols: int, bits: int, group_size: int,
             group_index: torch.Tensor | None = None) -> torch.Tensor:
        """The next dense matrix, dequantised (R, C) float32."""
        codes = self.packed(rows * cols, bits).reshape(rows, cols)
        scale, zero = self.grid(rows, cols, bits, group_size, group_index)
        return dequantize_asymmetric(codes, scale, zero)
