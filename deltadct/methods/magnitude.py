"""Magnitude pruning: keep the k entries of Δ largest in absolute value, drop the rest.

k = round(density · numel) (at least 1). With ``bits`` set, the density is the largest one whose
payload fits that many bits per parameter: fp16 values plus positions (a 1-bit mask, or 32-bit
indices when sparser than 1 in 32), i.e. density = max((bits − 1)/16, bits/48).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import register_method
from ._storage import decode_sparse, encode_sparse, to_fp16
from .base import Compressed, Method, MethodConfig, SizeKnob, check_range


@dataclass
class MagnitudeConfig(MethodConfig):
    #: fraction of entries kept
    density: float = 0.1
    #: payload budget in bits per parameter; when set it decides the density (``density`` is ignored)
    bits: float | None = None

    def validate(self) -> None:
        check_range("density", self.density, 0.0, 1.0, lo_open=True)
        if self.bits is not None:
            check_range("bits", self.bits, 0.0, 17.0, lo_open=True)

    def effective_density(self) -> float:
        if self.bits is None:
            return self.density
        return min(1.0, max((self.bits - 1.0) / 16.0, self.bits / 48.0))


@register_method
class Magnitude(Method):
    name = "magnitude"
    Config = MagnitudeConfig

    def size_knob(self) -> SizeKnob:
        return SizeKnob("density", 1e-4, 1.0, lambda v: {"density": v, "bits": None})

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        flat = delta.float().reshape(-1)
        k = max(1, min(flat.numel(), round(self.config.effective_density() * flat.numel())))
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
        return Compressed(encode_sparse(keep, to_fp16(flat[keep], "kept value", name)))

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        return decode_sparse(compressed.tensors, math.prod(shape)).reshape(tuple(shape))
