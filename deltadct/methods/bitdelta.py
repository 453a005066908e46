"""BitDelta (Liu et al., 2024): each delta matrix as its sign pattern times one scale.

Δ̂ = α · sign(Δ) with α = mean |Δ| (the L2-optimal scale for a fixed sign pattern), so a matrix costs
1 bit per parameter plus one fp32 number. Zero entries get the + sign (1 bit cannot say 0).
The scales can afterwards be fitted to the fine-tuned model's outputs with
:func:`deltadct.distill.distill_bitdelta_scales` (the paper's scale distillation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant import pack_bits, unpack_bits
from . import register_method
from .base import Compressed, Method, MethodConfig

#: name of the field holding the per-matrix scale (distillation rewrites only this field)
SCALE_FIELD = "scale"


@dataclass
class BitDeltaConfig(MethodConfig):
    pass


def sign_times_scale(signs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """±scale from a 0/1 sign tensor (1 means +); differentiable in ``scale``."""
    return (signs.float() * 2 - 1) * scale.float().reshape(())


@register_method
class BitDelta(Method):
    name = "bitdelta"
    Config = BitDeltaConfig

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        # mean |Δ| accumulated in float64 so the stored scale is the correctly rounded fp32 mean
        scale = delta.abs().double().mean().float().reshape(1)
        return Compressed({"signs": pack_bits((delta >= 0).reshape(-1), 1), SCALE_FIELD: scale})

    @staticmethod
    def signs(compressed: Compressed, shape) -> torch.Tensor:
        """The 0/1 sign pattern (1 = +) of a compressed matrix, as uint8 of ``shape``."""
        return unpack_bits(compressed.tensors["signs"], 1, math.prod(shape)).reshape(tuple(shape))

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        return sign_times_scale(self.signs(compressed, shape), compressed.tensors[SCALE_FIELD])
