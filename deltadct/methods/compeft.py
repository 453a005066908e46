"""ComPEFT (Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates
via Sparsification and Quantization"): the top-k entries of Δ by magnitude, as signs times one scale.

Δ̂ = α·σ(Δ)·sign(Δ) on the k = ⌊density·numel⌋ entries largest in |Δ|, 0 elsewhere; σ is the
standard deviation of the whole delta (before pruning, with Bessel's correction as ``torch.std``
computes it) and α = ``alpha``. Following the official code (``compress_and_update_parms`` of
prateeky2806/ComPEFT): top-k by magnitude, α·std as the one scale (``replace_factor``, default 1.0
there and here), signs of the kept entries. Stored: one fp32 scale α·σ, one sign bit per kept entry,
and the kept positions as the other sparse baselines store them (``methods/_storage.py``: a 1-bit
mask, or int32 indices below 1/32 density).

Departures: the official code flattens the whole model into one vector (one σ, one top-k over all
tensors); here, as for every method of this package, each matrix has its own σ and top-k. Its top-k
keeps every entry at or above the (d − ⌊K·d⌋)-th smallest magnitude, i.e. ⌊K·d⌋ + 1 entries plus
ties; here exactly k = ⌊density·d⌋ entries are kept (at least 1). A kept entry
that is exactly 0 gets sign +, where ``torch.sign`` would give 0 (one bit cannot say 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant import pack_bits, unpack_bits
from . import register_method
from ._storage import decode_positions, encode_positions
from .base import Compressed, Method, MethodConfig, SizeKnob, check_range


@dataclass
class ComPEFTConfig(MethodConfig):
    #: fraction of entries kept (the official ``k`` percentage / 100; their default k = 20)
    density: float = 0.2
    #: the scale is alpha · std(Δ) (the official ``replace_factor``)
    alpha: float = 1.0

    def validate(self) -> None:
        check_range("density", self.density, 0.0, 1.0, lo_open=True)
        check_range("alpha", self.alpha, 0.0, lo_open=True)


@register_method
class ComPEFT(Method):
    name = "compeft"
    Config = ComPEFTConfig

    def size_knob(self) -> SizeKnob:
        return SizeKnob("density", 1e-4, 1.0, lambda v: {"density": v})

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        flat = delta.float().reshape(-1)
        k = max(1, min(flat.numel(), math.floor(self.config.density * flat.numel())))
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
        std = flat.double().std() if flat.numel() > 1 else flat.double().abs().sum()
        scale = (self.config.alpha * std).float().reshape(1)
        return Compressed({"signs": pack_bits(flat[keep] >= 0, 1), "scale": scale, **encode_positions(keep)})

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        fields = compressed.tensors
        numel = math.prod(shape)
        keep = decode_positions(fields, numel)
        signs = unpack_bits(fields["signs"], 1, int(keep.sum())).float() * 2 - 1
        out = torch.zeros(numel, dtype=torch.float32, device=fields["scale"].device)
        out[keep] = signs * fields["scale"].float()
        return out.reshape(tuple(shape))
