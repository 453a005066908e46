"""DARE (Yu et al., 2024, "Language Models are Super Mario"): drop and rescale.

Each entry of Δ is dropped with probability ``p`` and the survivors are scaled by 1/(1−p), so the
reconstruction equals Δ in expectation. Stored: survivors' values in fp16 and their positions (a
packed 1-bit mask, or int32 indices when fewer than 1 in 32 entries survive). The random mask comes
from :meth:`Method.generator`, seeded by the config seed and the tensor name, so it is reproducible
and independent of the order tensors are compressed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import register_method
from ._storage import decode_sparse, encode_sparse, to_fp16
from .base import Compressed, Method, MethodConfig, SizeKnob


@dataclass
class DareConfig(MethodConfig):
    #: drop probability of each entry (the paper's 0.9 keeps one in ten)
    p: float = 0.9

    def validate(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ConfigError(f"option 'p': {self.p!r} must be in [0, 1) (the drop probability)")


@register_method
class Dare(Method):
    name = "dare"
    Config = DareConfig

    def size_knob(self) -> SizeKnob:
        return SizeKnob("p", 0.0, 0.999, lambda v: {"p": v}, decreasing=True)

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        flat = delta.float().reshape(-1)
        noise = torch.rand(flat.shape, generator=self.generator(name, flat.device), device=flat.device)
        keep = noise >= self.config.p
        values = to_fp16(flat[keep] / (1.0 - self.config.p), "rescaled DARE value", name)
        return Compressed(encode_sparse(keep, values))

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        return decode_sparse(compressed.tensors, math.prod(shape)).reshape(tuple(shape))
