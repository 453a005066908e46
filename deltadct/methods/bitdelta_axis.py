"""Per-axis 1-bit deltas: sign(Δ) with one fp16 scale per row or per column, the axis chosen per matrix.

BitDelta (Liu et al., 2024) stores sign(Δ) and one scale per matrix. With a scale per row instead,
the L2-optimal scale for row i's fixed sign pattern is mean_j |Δ_ij| (minimising
Σ_j (|Δ_ij| − s)² gives the mean), and likewise per column; both cost 1 bit per parameter plus 16
bits per row (column). Each matrix is compressed both ways and keeps the axis whose reconstruction,
with the scales as stored (fp16), has the smaller squared error (rows on a tie); the axis is
recorded in the file (``meta["axis"]``). Zero entries get the + sign, as in BitDelta.
Conv kernels are seen as (out, in·k·k) matrices, so their axes are output channels / fan-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..quant import pack_bits, unpack_bits
from . import register_method
from ._storage import to_fp16
from .base import Compressed, Method, MethodConfig, as_matrix, matrix_shape

AXES = ("row", "col")


@dataclass
class BitDeltaAxisConfig(MethodConfig):
    pass


def _signed(signs: torch.Tensor) -> torch.Tensor:
    return signs.float() * 2 - 1


@register_method
class BitDeltaAxis(Method):
    name = "bitdelta_axis"
    Config = BitDeltaAxisConfig

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        matrix = as_matrix(delta.float())
        signs = matrix >= 0
        magnitude = matrix.abs().double()
        scales = {"row": to_fp16(magnitude.mean(dim=1).float(), "a row scale", name),
                  "col": to_fp16(magnitude.mean(dim=0).float(), "a column scale", name)}
        signed = _signed(signs)
        errors = {axis: float((self._expand(axis, scale, matrix.shape) * signed - matrix).double().square().sum())
                  for axis, scale in scales.items()}
        axis = min(AXES, key=lambda a: (errors[a], AXES.index(a)))
        return Compressed({"signs": pack_bits(signs.reshape(-1), 1), "scale": scales[axis]}, {"axis": axis})

    @staticmethod
    def _expand(axis: str, scale: torch.Tensor, shape) -> torch.Tensor:
        return scale.float().unsqueeze(1 if axis == "row" else 0).expand(tuple(shape))

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        axis = compressed.meta.get("axis")
        if axis not in AXES:
            raise FormatError(f"bitdelta_axis entry records axis {axis!r}, not one of {list(AXES)}")
        m, n = matrix_shape(tuple(shape))
        signs = unpack_bits(compressed.tensors["signs"], 1, m * n).reshape(m, n)
        return (_signed(signs) * self._expand(axis, compressed.tensors["scale"], (m, n))).reshape(tuple(shape))
