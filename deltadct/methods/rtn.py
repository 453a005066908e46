"""Round-to-nearest (RTN): k-bit asymmetric quantisation of Δ in groups along each row.

The GPTQ family's quantiser without GPTQ's error feedback (:func:`deltadct.quant.quantize_asymmetric`):
each row of the delta matrix (conv kernels as (out, in·k·k)) is cut into groups of ``group_size``
consecutive entries (the last group of a row may be shorter); a group's grid runs from
min(x, 0) to max(x, 0) in 2^k − 1 steps of one scale, shifted by an integer zero point so that 0 is
exactly a level. Deltas are heavy-tailed and centred on 0, so a grid without an exact zero (between
the group's min and max) moves every small entry; this one keeps them near 0.

Stored: k-bit codes, a k-bit zero point per group, and the group scales as fp16 fractions of the
matrix's largest scale (one fp32 number). Delta scales are often below fp16's normal range
(6·10⁻⁵, e.g. 4-bit groups of a 10⁻⁴-sized delta), where plain fp16 scales would lose most of their
digits; the fractions keep fp16's 11-bit precision. Cost: k + (16 + k)/group_size bits per
parameter plus 32 bits per matrix (2.14 at the 2-bit, 128-group default).

``grid="minmax"`` is the grid files of config version 1 hold (and the ablation without an exact zero):
levels from each group's min to its max, stored as fp16 (min, max).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import (asymmetric_scale, decode_range_fp16, dequantize, dequantize_asymmetric, encode_range_fp16,
                     pack_bits, quantize, quantize_asymmetric, row_groups, unpack_bits)
from . import register_method
from ._storage import check_fp16_range
from .base import (Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_choice, check_range, matrix_shape,
                   versioned_field)

#: (bits, group_size) settings a matched-bits run may choose from, cheapest first
SIZE_LADDER = tuple(sorted(((b, g) for b in range(1, 9) for g in (1024, 512, 256, 128, 64, 32)),
                           key=lambda s: s[0] + (16 + s[0]) / s[1]))
GRIDS = ("zero_point", "minmax")
#: smallest positive fp16 number: a scale fraction that would round to 0 is stored as this
_FP16_TINY = 2.0 ** -24


@dataclass
class RTNConfig(MethodConfig):
    VERSION = 2

    #: bits per code
    bits: int = 2
    #: consecutive entries of a row sharing one scale and zero point
    group_size: int = 128
    #: "zero_point": the GPTQ family's grid with 0 exactly on it; "minmax": uniform levels from the
    #: group's min to its max (fp16 min and max per group), what files of config version 1 hold
    grid: str = versioned_field("zero_point", since=2, before="minmax")

    def validate(self) -> None:
        check_range("bits", self.bits, 1, 8)
        check_range("group_size", self.group_size, 1)
        check_choice("grid", self.grid, GRIDS)


def encode_scales(scale: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Group scales as fp16 fractions of their maximum (fp32): the fields and the scales they decode to."""
    top = scale.amax().reshape(1)
    fractions = (scale / top).to(torch.float16)
    fractions = torch.where(fractions == 0, torch.full_like(fractions, _FP16_TINY), fractions)
    return {"scale": fractions.reshape(-1), "scale_max": top}, decode_scales(fractions, top)


def decode_scales(fractions: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return fractions.float() * top.float().reshape(())


@register_method
class RTN(Method):
    name = "rtn"
    Config = RTNConfig

    def size_knob(self) -> SizeKnob:
        return SizeKnob("bits/group_size", 0, len(SIZE_LADDER) - 1,
                        lambda i: dict(zip(("bits", "group_size"), SIZE_LADDER[int(i)], strict=True)), integer=True)

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        c = self.config
        matrix = as_matrix(delta.float())
        if c.grid == "minmax":
            return self._compress_minmax(matrix, name)
        fields, scale = encode_scales(asymmetric_scale(matrix, c.bits, c.group_size))
        codes, _, zero = quantize_asymmetric(matrix, c.bits, c.group_size, scale=scale.reshape(matrix.shape[0], -1))
        fields.update(codes=pack_bits(codes, c.bits), zero=pack_bits(zero, c.bits))
        return Compressed(fields)

    def _compress_minmax(self, matrix: torch.Tensor, name: str) -> Compressed:
        c = self.config
        check_fp16_range(matrix, "a group range", name)
        m, n = matrix.shape
        groups = row_groups(matrix, c.group_size).reshape(-1, c.group_size)
        fields, lo, hi = encode_range_fp16(groups.amin(dim=1), groups.amax(dim=1))
        fields["codes"] = pack_bits(quantize(groups, lo, hi, c.bits).reshape(m, -1)[:, :n], c.bits)
        return Compressed(fields)

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        c = self.config
        m, n = matrix_shape(tuple(shape))
        if c.grid == "minmax":
            codes = unpack_bits(compressed.tensors["codes"], c.bits, m * n).reshape(m, n)
            groups = row_groups(codes, c.group_size).reshape(-1, c.group_size)
            lo, hi = decode_range_fp16(compressed.tensors, groups.shape[0])
            return dequantize(groups, lo, hi, c.bits).reshape(m, -1)[:, :n].reshape(tuple(shape))
        groups = -(-n // c.group_size)
        fields = compressed.tensors
        codes = unpack_bits(fields["codes"], c.bits, m * n).reshape(m, n)
        zero = unpack_bits(fields["zero"], c.bits, m * groups).reshape(m, groups)
        scale = decode_scales(fields["scale"], fields["scale_max"]).reshape(m, groups)
        return dequantize_asymmetric(codes, scale, zero, c.group_size).reshape(tuple(shape))
