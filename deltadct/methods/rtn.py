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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import asymmetric_scale, dequantize_asymmetric, pack_bits, quantize_asymmetric, unpack_bits
from . import register_method
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_range, matrix_shape

#: (bits, group_size) settings a matched-bits run may choose from, cheapest first
SIZE_LADDER = tuple(sorted(((b, g) for b in range(1, 9) for g in (1024, 512, 256, 128, 64, 32)),
                           key=lambda s: s[0] + (16 + s[0]) / s[1]))
#: smallest positive fp16 number: a scale fraction that would round to 0 is stored as this
_FP16_TINY = 2.0 ** -24


@dataclass
class RTNConfig(MethodConfig):
    #: bits per code
    bits: int = 2
    #: consecutive entries of a row sharing one scale and zero point
    group_size: int = 128

    def validate(self) -> None:
        check_range("bits", self.bits, 1, 8)
        check_range("group_size", self.group_size, 1)


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
        fields, scale = encode_scales(asymmetric_scale(matrix, c.bits, c.group_size))
        codes, _, zero = quantize_asymmetric(matrix, c.bits, c.group_size, scale=scale.reshape(matrix.shape[0], -1))
        fields.update(codes=pack_bits(codes, c.bits), zero=pack_bits(zero, c.bits))
        return Compressed(fields)

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        c = self.config
        m, n = matrix_shape(tuple(shape))
        groups = -(-n // c.group_size)
        fields = compressed.tensors
        codes = unpack_bits(fields["codes"], c.bits, m * n).reshape(m, n)
        zero = unpack_bits(fields["zero"], c.bits, m * groups).reshape(m, groups)
        scale = decode_scales(fields["scale"], fields["scale_max"]).reshape(m, groups)
        return dequantize_asymmetric(codes, scale, zero, c.group_size).reshape(tuple(shape))
