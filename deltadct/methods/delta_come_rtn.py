"""Delta-CoMe with a round-to-nearest quantiser: the data-free variant of ``delta_come``.

Mixed-precision quantisation of the delta's singular vectors (Ping et al., 2024), without the
paper's GPTQ and calibration data. Recipe used here, for an m×n delta with SVD Δ = U S Vᵀ and r₀ = min(m, n):

1. Fold the singular values into both sides: A = U·√S (m×r₀), B = V·√S (n×r₀), so Δ = A Bᵀ.
2. Split the singular directions, largest first, into groups of decreasing precision
   (``bit_widths``, default 8, 3, 2 bits). Every group but the last has a size fixed as a fraction
   of r₀ (``rank_fractions``, rounded up); the defaults 2/4096 and 32/4096 are the paper's "first 2
   vectors at 8 bits, next 32 at 3 bits" for a 4096-wide model. The last group takes as many
   further directions as the remaining budget allows; all other directions are dropped.
3. Budget: direction k at width b costs b·(m+n) bits for its two quantised vectors plus 4 fp16
   numbers (min and max of each vector), and the payload may not exceed ``bits``·m·n bits. Groups
   are filled in order, so a tight budget shrinks the later groups first.
4. Each column of A and of B in a group is quantised uniformly at the group's width over its own
   range: (min, max) shrunk by the factor in :data:`CLIP_RATIOS` that gives that column the least
   squared error, stored as fp16 (rounded outward). Reconstruction is Â B̂ᵀ.

The paper quantises the vectors with GPTQ on calibration activations and keeps S apart (registered
as ``delta_come``); this data-free version folds √S into both factors and uses round-to-nearest with
the clipping search instead. Result records named ``delta_come`` that were made before the published
variant existed hold this method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..quant import (decode_range_fp16, dequantize, encode_range_fp16, pack_bits, packed_size, quantize,
                     unpack_bits)
from . import register_method
from ._storage import check_fp16_range
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_range, matrix_shape

#: side information per kept direction: fp16 (min, max) for its column of A and of B
RANGE_BITS_PER_DIRECTION = 4 * 16
#: shrink factors of a vector's (min, max) tried as its quantisation range; at 2–3 bits the best
#: uniform grid for a bell-shaped vector clips its extremes (the MSE-optimal Gaussian step is ~1σ at 2 bits)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(14))


@dataclass
class DeltaCoMeRTNConfig(MethodConfig):
    #: payload budget in bits per parameter
    bits: float = 1.0
    #: width of each group of singular directions, highest precision (largest singular values) first
    bit_widths: tuple[int, ...] = (8, 3, 2)
    #: size of every group but the last as a fraction of min(m, n); the last group fills the budget
    rank_fractions: tuple[float, ...] = (2 / 4096, 32 / 4096)

    def validate(self) -> None:
        check_range("bits", self.bits, 0.0, 32.0, lo_open=True)
        if not self.bit_widths or any(not 1 <= b <= 8 for b in self.bit_widths):
            raise ConfigError(f"option 'bit_widths': {list(self.bit_widths)} must be one or more widths in 1..8")
        if len(self.rank_fractions) != len(self.bit_widths) - 1:
            raise ConfigError(f"option 'rank_fractions': {list(self.rank_fractions)} needs one fraction per "
                              f"group but the last ({len(self.bit_widths) - 1} for bit_widths {list(self.bit_widths)})")
        if any(not 0.0 <= f <= 1.0 for f in self.rank_fractions) or sum(self.rank_fractions) > 1.0:
            raise ConfigError(f"option 'rank_fractions': {list(self.rank_fractions)} must be in [0, 1] "
                              "and sum to at most 1")


def group_ranks(m: int, n: int, cfg: DeltaCoMeRTNConfig) -> list[int]:
    """Number of singular directions in each precision group of an m×n delta (see module recipe)."""
    full = min(m, n)
    remaining_bits = cfg.bits * m * n
    left = full
    ranks = []
    for i, width in enumerate(cfg.bit_widths):
        cost = width * (m + n) + RANGE_BITS_PER_DIRECTION
        affordable = int(remaining_bits // cost)
        wanted = math.ceil(cfg.rank_fractions[i] * full) if i < len(cfg.rank_fractions) else left
        k = max(0, min(wanted, affordable, left))
        ranks.append(k)
        remaining_bits -= k * cost
        left -= k
    if sum(ranks) == 0:  # budget below one direction: keep the top one anyway, like lowrank's rank ≥ 1
        ranks[0] = 1
    return ranks


def _clipped_ranges(rows: torch.Tensor, ranks: list[int], widths: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range c·(min, max) with c in :data:`CLIP_RATIOS` that quantises it with least error."""
    lows, highs = [], []
    start = 0
    for width, k in zip(widths, ranks, strict=True):
        group = rows[start:start + k]
        lo, hi = group.amin(dim=1), group.amax(dim=1)
        best = torch.full_like(lo, torch.inf)
        best_ratio = torch.ones_like(lo)
        for ratio in CLIP_RATIOS:
            codes = quantize(group, lo * ratio, hi * ratio, width)
            err = (dequantize(codes, lo * ratio, hi * ratio, width) - group).square().sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            best_ratio = torch.where(better, torch.full_like(lo, ratio), best_ratio)
        lows.append(lo * best_ratio)
        highs.append(hi * best_ratio)
        start += k
    return torch.cat(lows), torch.cat(highs)


@register_method
class DeltaCoMeRTN(Method):
    """Fields: ``range`` (fp16, one (min, max) row per kept column of A, then per kept column of B)
    and ``codes`` (for each group in order, the packed codes of its A columns then its B columns)."""

    name = "delta_come_rtn"
    Config = DeltaCoMeRTNConfig

    def size_knob(self) -> SizeKnob:
        # the size stops growing once every direction is kept (at the last group's width)
        return SizeKnob("bits", 0.01, 32.0, lambda v: {"bits": v})

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        matrix = as_matrix(delta.float())
        m, n = matrix.shape
        ranks = group_ranks(m, n, self.config)
        kept = sum(ranks)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:kept].sqrt()
        a_rows = (u[:, :kept] * root).T  # direction k's column of A as row k
        b_rows = vh[:kept] * root.unsqueeze(1)
        a_lo, a_hi = _clipped_ranges(a_rows, ranks, self.config.bit_widths)
        b_lo, b_hi = _clipped_ranges(b_rows, ranks, self.config.bit_widths)
        check_fp16_range(torch.cat([a_lo, a_hi, b_lo, b_hi]), "a singular-vector range", name)
        fields, lo, hi = encode_range_fp16(torch.cat([a_lo, b_lo]), torch.cat([a_hi, b_hi]))
        streams, start = [], 0
        for width, k in zip(self.config.bit_widths, ranks, strict=True):
            for side_rows, offset in ((a_rows, 0), (b_rows, kept)):
                sel = slice(offset + start, offset + start + k)
                codes = quantize(side_rows[start:start + k], lo[sel], hi[sel], width)
                streams.append(pack_bits(codes, width))
            start += k
        fields["codes"] = torch.cat(streams)
        return Compressed(fields)

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        m, n = matrix_shape(tuple(shape))
        ranks = group_ranks(m, n, self.config)
        kept = sum(ranks)
        lo, hi = decode_range_fp16(compressed.tensors, 2 * kept)
        stream = compressed.tensors["codes"]
        a_parts, b_parts = [], []
        start, pos = 0, 0
        for width, k in zip(self.config.bit_widths, ranks, strict=True):
            for length, offset, parts in ((m, 0, a_parts), (n, kept, b_parts)):
                size = packed_size(k * length, width)
                codes = unpack_bits(stream[pos:pos + size], width, k * length).reshape(k, length)
                sel = slice(offset + start, offset + start + k)
                parts.append(dequantize(codes, lo[sel], hi[sel], width))
                pos += size
            start += k
        return (torch.cat(a_parts).T @ torch.cat(b_parts)).reshape(tuple(shape))
