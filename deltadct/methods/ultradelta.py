"""UltraDelta (Wang et al., NeurIPS 2025, "Breaking the Compression Ceiling: Data-Free Pipeline for
Ultra-Efficient Delta Compression"): quantise, prune per layer by a variance tier, rescale.

Recipe of the official code (``src/ultradelta_compression.py`` and ``src/ViT.py`` of
xiaohuiwang000/UltraDelta, settings of its ``run.sh``: mask_rate 0.97, step_size 0.01, 4 bits,
additional_factor 1.0), per fine-tuned model:

1. Quantise each matrix uniformly between its own min and max: v̂ = round((v − min)/(max − min)·(2^b − 1))
   / (2^b − 1)·(max − min) + min (``bits``; no zero point, as there).
2. Variance-tiered sparsity (``plan``): sort the matrices by the standard deviation of their quantised
   delta; those making up the lowest third of the parameters (counted cumulatively, in that order)
   drop ``mask_rate + step_size`` of their entries, the middle third ``mask_rate``, and the rest the
   rate that brings the parameter-weighted mean back to ``mask_rate``, clamped to [0, 0.99].
3. Distribution-aware pruning: within every quantisation level separately, a random
   round(count · rate) of the entries at that level are set to 0 (so the kept values keep the
   layer's value histogram); entries already 0 count towards the rate.
4. Rescale every kept value by additional_factor / (1 − mask_rate) (the global rate, as there).

Stored per matrix: the kept entries' ``bits``-bit level codes, their positions as the other sparse
methods store them (``methods/_storage.py``), and the fp32 (min, max). The random choice comes from
:meth:`Method.generator` (seed and tensor name), so files are reproducible.

Not implemented: the official trace-norm rescale works across the *set* of fine-tunes compressed
together (each task's deltas × (mean trace norm / its trace norm) / the largest such ratio); one
fine-tune per file, as here, makes that factor exactly 1. Whether the paper's trace-norm step means
more than this cross-task normalisation could not be established from the official code alone.
Departure: a matrix whose entries are all equal (max = min) gets code 0 everywhere instead of the
official division by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import ConfigError
from ..quant import pack_bits, unpack_bits
from . import register_method
from ._storage import decode_positions, encode_positions
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_range

#: largest per-layer drop rate the tiering may assign (the official clamp)
MAX_LAYER_RATE = 0.99


@dataclass
class UltraDeltaConfig(MethodConfig):
    #: parameter-weighted mean share of entries dropped
    mask_rate: float = 0.97
    #: extra drop rate of the lowest-variance third (and the tier spacing)
    step_size: float = 0.01
    #: width of the uniform min–max quantisation applied before pruning
    bits: int = 4
    #: extra factor on the 1 / (1 − mask_rate) rescale
    additional_factor: float = 1.0

    def validate(self) -> None:
        check_range("mask_rate", self.mask_rate, 0.0, 1.0)
        check_range("step_size", self.step_size, 0.0, 1.0)
        if self.mask_rate + self.step_size > MAX_LAYER_RATE:
            raise ConfigError(f"options 'mask_rate' + 'step_size': {self.mask_rate:g} + {self.step_size:g} must be "
                              f"at most {MAX_LAYER_RATE} (the lowest-variance third drops that share)")
        check_range("bits", self.bits, 1, 8)
        check_range("additional_factor", self.additional_factor, 0.0, lo_open=True)


def quantize_min_max(matrix: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Level codes of the official min–max quantiser and the fp32 (min, max) they decode with."""
    lo, hi = matrix.amin(), matrix.amax()
    span = hi - lo
    top = (1 << bits) - 1
    codes = torch.round((matrix - lo) / torch.where(span > 0, span, torch.ones_like(span)) * top)
    return codes.to(torch.uint8), torch.stack([lo, hi]).float()


def dequantize_min_max(codes: torch.Tensor, bounds: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = bounds[0], bounds[1]
    return codes.float() / ((1 << bits) - 1) * (hi - lo) + lo


def tier_rates(stds: list[float], sizes: list[int], mask_rate: float, step_size: float) -> list[float]:
    """Each layer's drop rate from its standard deviation (step 2 of the module recipe)."""
    total = sum(sizes)
    order = sorted(range(len(stds)), key=lambda i: stds[i])
    rates = [0.0] * len(stds)
    accumulated, low_params, mid_params, top = 0, 0, 0, []
    for i in order:
        accumulated += sizes[i]
        if accumulated <= total / 3:
            rates[i], low_params = mask_rate + step_size, low_params + sizes[i]
        elif accumulated <= 2 * total / 3:
            rates[i], mid_params = mask_rate, mid_params + sizes[i]
        else:
            top.append(i)
    top_params = sum(sizes[i] for i in top)
    top_rate = mask_rate
    if top_params:
        top_rate = (mask_rate * total - mask_rate * mid_params - (mask_rate + step_size) * low_params) / top_params
        top_rate = min(MAX_LAYER_RATE, max(0.0, top_rate))
    for i in top:
        rates[i] = top_rate
    return rates


def drop_within_levels(codes: torch.Tensor, zero: torch.Tensor, rate: float, generator: torch.Generator,
                       levels: int) -> torch.Tensor:
    """Keep mask: in each level, a random round(count·r) entries dropped, r adjusted for entries already 0."""
    current = float(zero.float().mean())
    adjusted = 0.0 if current >= 1 else max(0.0, (rate - current) / (1 - current))
    counts = torch.bincount(codes.long(), minlength=levels)
    drops = torch.round(counts.double() * adjusted).long()  # half to even, like Python's round()
    noise = torch.rand(codes.shape, generator=generator, device=codes.device, dtype=torch.float64)
    order = torch.argsort(codes.double() + noise)  # by level, then randomly within it
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=codes.device)
    rank -= starts[codes.long()]
    return rank >= drops[codes.long()]


@register_method
class UltraDelta(Method):
    name = "ultradelta"
    Config = UltraDeltaConfig
    needs_plan = True

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._rates: dict[str, float] = {}

    def size_knob(self) -> SizeKnob:
        return SizeKnob("mask_rate", 0.0, MAX_LAYER_RATE - self.config.step_size,
                        lambda v: {"mask_rate": v}, decreasing=True)

    def plan(self, deltas: Iterable[tuple[str, torch.Tensor]], *, header_bytes: int = 0) -> None:
        c = self.config
        names, stds, sizes = [], [], []
        for name, delta in deltas:
            matrix = as_matrix(delta.float())
            codes, bounds = quantize_min_max(matrix, c.bits)
            values = dequantize_min_max(codes, bounds, c.bits)
            # population standard deviation, as the official tiering computes it
            stds.append(float(values.double().sub(values.double().mean()).square().mean().sqrt())
                        if values.numel() > 1 else 0.0)
            names.append(name)
            sizes.append(values.numel())
        self._rates = dict(zip(names, tier_rates(stds, sizes, c.mask_rate, c.step_size), strict=True))

    def layer_rate(self, name: str) -> float:
        if name not in self._rates:
            raise ConfigError(f"ultradelta: tensor {name!r} was not seen by plan(); its drop rate is set by "
                              "plan() over every tensor of the model before compress()")
        return self._rates[name]

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        c = self.config
        matrix = as_matrix(delta.float())
        codes, bounds = quantize_min_max(matrix, c.bits)
        flat_codes = codes.reshape(-1)
        zero = dequantize_min_max(flat_codes, bounds, c.bits) == 0
        keep = drop_within_levels(flat_codes, zero, self.layer_rate(name), self.generator(name, matrix.device),
                                  1 << c.bits)
        return Compressed({"codes": pack_bits(flat_codes[keep], c.bits), "range": bounds, **encode_positions(keep)})

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        c = self.config
        fields = compressed.tensors
        numel = math.prod(shape)
        keep = decode_positions(fields, numel)
        codes = unpack_bits(fields["codes"], c.bits, int(keep.sum()))
        out = torch.zeros(numel, dtype=torch.float32, device=fields["range"].device)
        out[keep] = dequantize_min_max(codes, fields["range"], c.bits)
        return (out * (c.additional_factor / (1.0 - c.mask_rate))).reshape(tuple(shape))
