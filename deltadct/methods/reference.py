"""Reference points for every comparison: ``none`` (the delta stored exactly) and ``zero`` (the base alone).

``none`` keeps Δ in fp32, so base + Δ̂ is the fine-tuned model up to fp32 rounding (exact for bf16/fp16
weights); ``zero`` stores nothing, so the "reconstructed" model is the base. Any method should land
between the two: as accurate as ``none`` at best, never less accurate than ``zero``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_method
from .base import Compressed, Method, MethodConfig


@dataclass
class NoneConfig(MethodConfig):
    pass


@register_method
class NoCompression(Method):
    name = "none"
    Config = NoneConfig

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        return Compressed({"delta": delta.float().contiguous().clone()})

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        return compressed.tensors["delta"].float().reshape(tuple(shape)).clone()


@dataclass
class ZeroConfig(MethodConfig):
    pass


@register_method
class ZeroDelta(Method):
    name = "zero"
    Config = ZeroConfig

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        # An empty field costs 0 payload bytes but tells reconstruct() which device the caller
        # loaded the entry onto (the Method interface passes no device).
        return Compressed({"device": delta.new_empty(0, dtype=torch.uint8)})

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=torch.float32, device=compressed.tensors["device"].device)
