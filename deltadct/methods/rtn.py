"""Round-to-nearest (RTN): k-bit uniform quantisation of Δ in groups along each row.

Each row of the delta matrix (conv kernels as (out, in·k·k)) is cut into groups of ``group_size``
consecutive entries (the last group of a row may be shorter); every group is rounded onto 2^k
levels between its own min and max, stored as fp16 (rounded outward so the grid covers the group).
Cost: k bits per parameter plus 32 bits per group (2.25 bits/param at the 2-bit, 128-group default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import dequantize, encode_range_fp16, decode_range_fp16, pack_bits, quantize, unpack_bits
from . import register_method
from ._storage import check_fp16_range
from .base import Compressed, Method, MethodConfig, as_matrix, check_range, matrix_shape


@dataclass
class RTNConfig(MethodConfig):
    #: bits per code
    bits: int = 2
    #: consecutive entries of a row sharing one (min, max) range
    group_size: int = 128

    def validate(self) -> None:
        check_range("bits", self.bits, 1, 8)
        check_range("group_size", self.group_size, 1)


def _padded_groups(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    """(m, n) → (m·G, group_size), each row right-padded by repeating its last entry.

    Repeating a real entry leaves every group's min and max unchanged, so padding costs nothing
    and its codes are never stored.
    """
    m, n = matrix.shape
    pad = (-n) % group_size
    if pad:
        matrix = torch.cat([matrix, matrix[:, -1:].expand(m, pad)], dim=1)
    return matrix.reshape(-1, group_size)


@register_method
class RTN(Method):
    name = "rtn"
    Config = RTNConfig

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        c = self.config
        matrix = as_matrix(delta.float())
        check_fp16_range(matrix, "a group range", name)
        m, n = matrix.shape
        groups = _padded_groups(matrix, c.group_size)
        fields, lo, hi = encode_range_fp16(groups.amin(dim=1), groups.amax(dim=1))
        codes = quantize(groups, lo, hi, c.bits).reshape(m, -1)[:, :n]
        fields["codes"] = pack_bits(codes, c.bits)
        return Compressed(fields)

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        c = self.config
        m, n = matrix_shape(tuple(shape))
        codes = unpack_bits(compressed.tensors["codes"], c.bits, m * n).reshape(m, n)
        groups = _padded_groups(codes, c.group_size)
        lo, hi = decode_range_fp16(compressed.tensors, groups.shape[0])
        matrix = dequantize(groups, lo, hi, c.bits).reshape(m, -1)[:, :n]
        return matrix.reshape(tuple(shape))
