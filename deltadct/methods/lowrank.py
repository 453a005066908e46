"""Low-rank: the delta's truncated SVD, with the rank set by a bit budget and the factors in fp16.

For an m×n matrix the rank is r = ⌊bits·m·n / (16·(m+n))⌋ (at least 1, at most min(m, n)), the
largest rank whose two fp16 factors (U·S, m×r, and V, n×r) fit in ``bits`` per parameter.
By Eckart–Young this is the best rank-r approximation; only the fp16 rounding is added.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_method
from ._storage import to_fp16
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_range


@dataclass
class LowRankConfig(MethodConfig):
    #: payload budget in bits per parameter that the fp16 factors may use
    bits: float = 1.0

    def validate(self) -> None:
        check_range("bits", self.bits, 0.0, 32.0, lo_open=True)


def rank_for_budget(m: int, n: int, bits: float) -> int:
    """Largest rank whose fp16 factors cost at most ``bits`` per parameter (clamped to 1..min(m, n))."""
    return max(1, min(min(m, n), int(bits * m * n // (16 * (m + n)))))


@register_method
class LowRank(Method):
    name = "lowrank"
    Config = LowRankConfig

    def size_knob(self) -> SizeKnob:
        # every matrix keeps rank ≥ 1, so small budgets all measure the rank-1 size
        return SizeKnob("bits", 0.01, 32.0, lambda v: {"bits": v})

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        matrix = as_matrix(delta.float())
        m, n = matrix.shape
        r = rank_for_budget(m, n, self.config.bits)
        # full (deterministic) SVD: randomised svd_lowrank would need the global RNG
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return Compressed({"us": to_fp16(u[:, :r] * s[:r], "U·S", name),
                           "v": to_fp16(vh[:r].T, "V", name).contiguous()})

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        us, v = compressed.tensors["us"].float(), compressed.tensors["v"].float()
        return (us @ v.T).reshape(tuple(shape))
