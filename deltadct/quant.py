"""Uniform quantisation with per-row ranges, bit packing, and the encodings of those ranges.

All functions work on a batch of rows at once: ``values`` is (N, k) and each row (one patch, one
group) gets its own ``lo``/``hi`` range. Codes are integers in ``[0, 2**bits - 1]``;
``dequantize(quantize(x)) `` is within half a step of ``x`` for every entry inside the range.
"""
from __future__ import annotations

import functools
import math

import torch


def _levels(bits: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor | int:
    """``2**bits − 1`` as a scalar, or per row as an (N, 1) tensor when ``bits`` is a tensor of widths."""
    if isinstance(bits, torch.Tensor):
        return ((1 << bits.to(torch.int32)) - 1).to(dtype).unsqueeze(-1)
    return (1 << bits) - 1


def quantize(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Round each row of ``values`` onto ``2**bits`` evenly spaced levels from ``lo`` to ``hi``.

    ``lo``/``hi`` are (N,) and are the *decoded* range (what the reader will see), so encoder and
    decoder agree on the grid. ``bits`` is one width for all rows or an (N,) tensor of widths (a
    row of width 0 gets code 0). Returns uint8 codes of the same shape as ``values``.
    """
    levels = _levels(bits, values.dtype)
    lo = lo.to(values.dtype).unsqueeze(-1)
    span = (hi.to(values.dtype).unsqueeze(-1) - lo)
    step = torch.where(span > 0, span / levels, torch.ones_like(span))
    codes = (values - lo).div_(step).round_()
    if isinstance(levels, torch.Tensor):
        return torch.minimum(codes.clamp_(min=0), levels, out=codes).to(torch.uint8)
    return codes.clamp_(0, levels).to(torch.uint8)


def dequantize(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int | torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``lo + code · (hi − lo) / (2**bits − 1)`` (rows of width 0 give ``lo``)."""
    levels = _levels(bits, dtype)
    if isinstance(levels, torch.Tensor):
        levels = levels.clamp(min=1)  # width-0 rows have lo = hi and only code 0: avoid 0/0
    lo = lo.to(dtype).unsqueeze(-1)
    step = (hi.to(dtype).unsqueeze(-1) - lo) / levels
    return lo + codes.to(dtype) * step


# ---------------------------------------------------------------------------------------------
# bit packing: codes of any width 1..8 into a dense little-endian bit stream (uint8)
# ---------------------------------------------------------------------------------------------
#: a word of 8/bits bytes holds the codes of one packed byte (little-endian, as torch views are on x86/Arm)
_WORD_DTYPE = {1: torch.int64, 2: torch.int32, 4: torch.int16}


@functools.lru_cache(maxsize=None)
def _fold_steps(bits: int) -> list[tuple[int, int, int]]:
    """(shift, mask after merging, mask before merging) per step of the pack fold for ``bits`` | 8.

    Before step k the codes sit in fields of ``bits·2**k`` bits every ``8·2**k`` bits; the step
    merges neighbouring fields, doubling both. Masks are written as signed ints of the word width.
    """
    word_bits = 8 * (8 // bits)

    def fields(width: int, spacing: int) -> int:
        mask = sum(((1 << width) - 1) << pos for pos in range(0, word_bits, spacing))
        return mask - (1 << word_bits) if mask >= 1 << (word_bits - 1) else mask

    steps, width, spacing = [], bits, 8
    while width < 8:
        steps.append((spacing - width, fields(2 * width, 2 * spacing), fields(width, spacing)))
        width, spacing = 2 * width, 2 * spacing
    return steps


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes (each < 2**bits) into ``ceil(n·bits/8)`` bytes.

    Bit ``j`` of code ``i`` lands at stream position ``i·bits + j`` (LSB first within a byte).
    Widths that divide 8 use a shift-or over ``8/bits`` codes per byte; others go through a bit
    plane. Both are pure tensor ops, so they run on any device.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-n) % per_byte
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        elif codes.storage_offset() % per_byte:  # a word view needs a word-aligned start
            codes = codes.clone()
        # one machine word holds the per_byte codes of one output byte; halve the spacing of the code
        # fields log2(per_byte) times (shift, or, mask) until they sit side by side in the low byte
        word = codes.view(_WORD_DTYPE[bits])
        for shift, packed_mask, _ in _fold_steps(bits):
            word = (word | (word >> shift)) & packed_mask
        return word.to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    plane = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-plane.numel()) % 8
    if pad:
        plane = torch.cat([plane, plane.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (plane.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    packed = packed.reshape(-1).to(torch.uint8)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"packed stream has {packed.numel()} bytes, expected "
                         f"{packed_size(count, bits)} for {count} codes of {bits} bits")
    if bits == 8:
        return packed[:count].clone()
    if 8 % bits == 0:
        # the fold of pack_bits run backwards: spread each byte's codes one per byte of a word
        word = packed.to(_WORD_DTYPE[bits])
        for shift, _, spread_mask in reversed(_fold_steps(bits)):
            word = (word | (word << shift)) & spread_mask
        return word.view(torch.uint8)[:count]
    plane = ((packed.unsqueeze(1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1)
    plane = plane.reshape(-1)[: count * bits].reshape(count, bits).to(torch.int32)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (plane * weights).sum(dim=1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# encodings of per-row ranges (the "side information")
# ---------------------------------------------------------------------------------------------
RANGE_ENCODINGS = ("fp16", "log")
#: log2 shift of a layer's magnitude scale (a factor 1 + 7e-6) so its end points stay covered
_LOG_MARGIN = 1e-5


def encode_range_fp16(lo: torch.Tensor, hi: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The paper's side information: min and max of each row stored as fp16 (32 bits per row).

    Rounds outward (lo down, hi up) so the decoded range still covers every value.
    """
    lo16 = lo.to(torch.float16)
    hi16 = hi.to(torch.float16)
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, -torch.inf)), lo16)
    hi16 = torch.where(hi16.float() < hi, torch.nextafter(hi16, torch.full_like(hi16, torch.inf)), hi16)
    ranges = torch.stack([lo16, hi16], dim=1)
    return {"range": ranges}, lo16.float(), hi16.float()


def decode_range_fp16(fields: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    ranges = fields["range"].float()
    return ranges[:, 0], ranges[:, 1]


def encode_range_log(lo: torch.Tensor, hi: torch.Tensor, bits: int
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Cheap side information: each range end as a ``bits``-bit code on a per-layer log scale.

    The range is widened to contain zero (``lo ≤ 0 ≤ hi``; DCT patches of real deltas almost always
    do already), so only magnitudes are coded: code 0 means exactly 0, codes 1..2**bits−1 are
    evenly spaced in log2 between the layer's smallest and largest magnitude, stored as two fp32
    numbers. Magnitudes are rounded *up*, so the decoded range always covers the row.
    """
    mags = torch.stack([(-lo).clamp(min=0), hi.clamp(min=0)], dim=1).float()
    top = (1 << bits) - 1
    # branch-free (no host sync): smallest positive magnitude via a masked min; an all-zero layer
    # gets log_range (0, 0) and only zero codes
    positive = mags > 0
    any_positive = positive.any()
    padded = torch.cat([mags.reshape(-1), mags.new_zeros(1)])  # amin/amax need a non-empty input
    # shift the scale up a little: float32 log2 → exp2 does not give the end points back exactly,
    # and code 1 / the top code must decode at or above the smallest / largest magnitude
    log_lo = torch.log2(torch.where(padded > 0, padded, torch.inf).amin()) + _LOG_MARGIN
    log_hi = torch.log2(padded.amax()) + _LOG_MARGIN
    log_range = torch.where(any_positive, torch.stack([log_lo, log_hi]), 0.0).float()
    step = (log_range[1] - log_range[0]) / max(top - 1, 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    # start one level below ceil() and move up while the decoded magnitude is short: float rounding
    # in log2/exp2 makes a bare ceil() miss the smallest covering level either way
    level = torch.ceil((torch.log2(mags.clamp(min=torch.finfo(torch.float32).tiny)) - log_range[0]) / step) - 1
    codes = torch.where(positive, level.clamp(0, top - 1) + 1, torch.zeros_like(level)).to(torch.uint8)
    for _ in range(2):
        dlo, dhi = _decode_log(codes, log_range, bits)
        codes += ((torch.stack([-dlo, dhi], dim=1) < mags) & (codes < top)).to(torch.uint8)
    fields = {"range_codes": pack_bits(codes.reshape(-1), bits), "log_range": log_range}
    dlo, dhi = _decode_log(codes, log_range, bits)
    return fields, dlo, dhi


def _decode_log(codes: torch.Tensor, log_range: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    mags = _log_magnitudes(codes, log_range, bits)
    return -mags[:, 0], mags[:, 1]


def decode_range_log(fields: dict[str, torch.Tensor], count: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = unpack_bits(fields["range_codes"], bits, count * 2).reshape(count, 2)
    return _decode_log(codes, fields["log_range"].float(), bits)


# ---------------------------------------------------------------------------------------------
# asymmetric (zero-point) round-to-nearest in groups along rows: the GPTQ family's quantiser
# ---------------------------------------------------------------------------------------------
def row_groups(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    """(m, n) → (m, G, group_size), G = ⌈n / group_size⌉, each row right-padded with its last entry.

    Repeating a real entry leaves every group's min and max unchanged, so the padding never moves a
    group's grid; callers crop it away (``[..., :n]``) after working on whole groups.
    """
    m, n = matrix.shape
    pad = (-n) % group_size
    if pad:
        matrix = torch.cat([matrix, matrix[:, -1:].expand(m, pad)], dim=1)
    return matrix.reshape(m, -1, group_size)


def _zero_inclusive_range(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)


def asymmetric_scale(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Each group's step (hi − lo) / (2^b − 1) over its range widened to hold 0, as (m, G) float32.

    An all-zero group gets step 1: every entry then sits on its zero point, exactly, whatever the step
    (GPTQ's ``Quantizer`` uses the range [−1, 1] there, which is the same up to that step).
    """
    lo, hi = _zero_inclusive_range(row_groups(values.float(), group_size))
    span = hi - lo
    return torch.where(span > 0, span / ((1 << bits) - 1), torch.ones_like(span))


def quantize_asymmetric(values: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point uniform quantisation of each group of ``group_size`` consecutive entries of a row.

    For a group x with lo = min(min x, 0) and hi = max(max x, 0): scale = (hi − lo) / (2^b − 1),
    zero = clamp(round(−lo / scale), 0, 2^b − 1) and q = clamp(round(x / scale) + zero, 0, 2^b − 1),
    so that x̂ = scale·(q − zero) has 0 exactly on its grid (the GPTQ family's asymmetric quantiser).
    ``scale`` (m, G), when given, is the step the decoder will read back (e.g. after rounding it to
    its storage precision); zero points and codes are computed on that grid. Default:
    :func:`asymmetric_scale` in float32.

    ``values`` is (m, n); the last group of a row may be shorter. Returns uint8 codes (m, n), the
    float32 scales (m, G) and uint8 zero points (m, G).
    """
    m, n = values.shape
    top = (1 << bits) - 1
    groups = row_groups(values.float(), group_size)
    step = (asymmetric_scale(values, bits, group_size) if scale is None else scale).float()
    lo, _ = _zero_inclusive_range(groups)
    zero = torch.round(-lo / step).clamp_(0, top)
    codes = (torch.round(groups / step.unsqueeze(2)) + zero.unsqueeze(2)).clamp_(0, top)
    return codes.reshape(m, -1)[:, :n].to(torch.uint8), step, zero.to(torch.uint8)


def dequantize_asymmetric(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_asymmetric`: scale·(q − zero) per group, float32 of ``codes``' shape."""
    m, n = codes.shape
    groups = row_groups(codes, group_size).float()
    out = scale.float().unsqueeze(2) * (groups - zero.float().unsqueeze(2))
    return out.reshape(m, -1)[:, :n]


# ---------------------------------------------------------------------------------------------
# zero-centred quantisers: fixed unit levels × one scale per row
# ---------------------------------------------------------------------------------------------
#: per-row quantisers of the codec: the paper's uniform grid between each row's min and max, or
#: levels symmetric about zero times one per-row scale (evenly spaced, or Lloyd–Max for a Gaussian)
QUANTIZERS = ("minmax", "symmetric", "lloyd")
#: scale refinements of :func:`fit_scale` (each one can only lower the row's squared error)
SCALE_ITERATIONS = 6
#: starting scales :func:`fit_scale` tries, as multiples of the Gaussian starting point
SCALE_CANDIDATES = tuple(0.5 + 0.05 * i for i in range(23))


@functools.lru_cache(maxsize=None)
def _lloyd_max_gaussian(bits: int) -> tuple[float, ...]:
    """The 2**bits Lloyd–Max reconstruction levels of a standard normal variable (in units of σ).

    Lloyd's algorithm in closed form: cells end at the midpoints between levels, and each level
    moves to the mean of the normal density on its cell, ``(φ(a) − φ(b)) / (Φ(b) − Φ(a))``, until
    nothing moves (Max, 1960, tabulates the result: ±0.7979 at 1 bit, ±0.4528 / ±1.510 at 2 bits).
    """
    count = 1 << bits
    levels = torch.linspace(-2.0, 2.0, count, dtype=torch.float64)
    inf = torch.tensor([torch.inf], dtype=torch.float64)
    for _ in range(100_000):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        density = torch.exp(-edges * edges / 2) / math.sqrt(2 * math.pi)
        mass = torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])
        updated = (density[:-1] - density[1:]) / mass
        if torch.equal(updated, levels) or torch.allclose(updated, levels, rtol=0, atol=1e-13):
            break
        levels = updated
    return tuple(((updated - updated.flip(0)) / 2).tolist())  # exactly antisymmetric


def unit_levels(quantizer: str, bits: int) -> torch.Tensor:
    """The 2**bits sorted levels of a zero-centred quantiser, scaled so the outermost is ±1 (float64).

    ``symmetric``: evenly spaced, ``(2k + 1 − 2**bits) / (2**bits − 1)`` (at 1 bit ±1, at 2 bits
    ±1/3, ±1); ``lloyd``: the Gaussian Lloyd–Max levels over their largest. Both are ±1 at 1 bit.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    if quantizer == "symmetric":
        top = (1 << bits) - 1
        return (2 * torch.arange(1 << bits, dtype=torch.float64) - top) / top
    if quantizer == "lloyd":
        levels = torch.tensor(_lloyd_max_gaussian(bits), dtype=torch.float64)
        return levels / levels[-1]
    raise ValueError(f"unknown zero-centred quantizer {quantizer!r}; choose from {QUANTIZERS[1:]}")


def nearest_level(values: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the level nearest to each ``value / scale`` (rows of ``values`` share their
    ``scale``, (N,)); rows of scale 0 get the code of the level nearest to 0 from above."""
    levels = levels.to(values.device, values.dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(values.dtype).unsqueeze(-1)
    # a value exactly between two levels goes to the lower one (bucketize, right=False)
    return torch.bucketize(values / safe, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)


def dequantize_levels(codes: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`nearest_level`: ``scale · levels[code]`` per entry."""
    return levels.to(codes.device, dtype)[codes.long()] * scale.to(dtype).unsqueeze(-1)


def fit_scale(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` (N, k), the scale ``s`` that minimises ``Σ (x − s·levels[code(x/s)])²``.

    The error is not convex in ``s`` at 2+ bits, so the best of :data:`SCALE_CANDIDATES` multiples
    of the Gaussian starting point (outermost level at the outermost Lloyd level × rms) is refined
    by alternating minimisation: codes for the current scale, then the least-squares scale for those
    codes, ``Σ x·l / Σ l²`` (each half-step can only lower the error). For ±1 levels (1 bit) the
    codes are the signs whatever the scale, so one step gives the exact optimum, mean |x|.
    """
    x = values.float()
    levels = levels.to(x.device, torch.float32)
    bits = len(levels).bit_length() - 1
    start = x.pow(2).mean(dim=1).sqrt() * _lloyd_max_gaussian(bits)[-1]

    def error(scale: torch.Tensor) -> torch.Tensor:
        return (levels[nearest_level(x, scale, levels).long()] * scale.unsqueeze(-1) - x).pow(2).sum(dim=1)

    scale = start
    if bits > 1:
        best = error(start)
        for factor in SCALE_CANDIDATES:
            candidate = start * factor
            err = error(candidate)
            scale, best = torch.where(err < best, candidate, scale), torch.minimum(err, best)
    for _ in range(SCALE_ITERATIONS if bits > 1 else 1):
        picked = levels[nearest_level(x, scale, levels).long()]
        denom = picked.pow(2).sum(dim=1)
        scale = torch.where(denom > 0, (x * picked).sum(dim=1) / denom.clamp(min=1e-30), torch.zeros_like(scale))
    return scale.clamp(min=0)


def encode_scale_log(scales: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-row scales as ``bits``-bit codes on a per-layer log scale (the log range coding's grid
    for one magnitude per row), rounded to the nearest level; returns the fields and the decoded scales.

    Code 0 means 0; codes 1..2**bits−1 are evenly spaced in log2 between the smallest and largest
    positive scale, stored as two fp32 numbers (``log_scale``). Nearest rather than upward rounding:
    a scale, unlike a range, need not cover anything, and nearest halves the worst log error.
    """
    scales = scales.float()
    top = (1 << bits) - 1
    positive = scales > 0
    padded = torch.cat([scales, scales.new_zeros(1)])
    log_lo = torch.log2(torch.where(padded > 0, padded, torch.inf).amin())
    log_range = torch.where(positive.any(), torch.stack([log_lo, torch.log2(padded.amax())]), 0.0).float()
    step = (log_range[1] - log_range[0]) / max(top - 1, 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    level = torch.round((torch.log2(scales.clamp(min=torch.finfo(torch.float32).tiny)) - log_range[0]) / step)
    codes = torch.where(positive, level.clamp(0, top - 1) + 1, torch.zeros_like(level)).to(torch.uint8)
    fields = {"scale_codes": pack_bits(codes, bits), "log_scale": log_range}
    return fields, _log_magnitudes(codes, log_range, bits)


def decode_scale_log(fields: dict[str, torch.Tensor], count: int, bits: int) -> torch.Tensor:
    return _log_magnitudes(unpack_bits(fields["scale_codes"], bits, count), fields["log_scale"].float(), bits)


def _log_magnitudes(codes: torch.Tensor, log_range: torch.Tensor, bits: int) -> torch.Tensor:
    """Magnitude of each log code: 0 for code 0, else ``2^(log_lo + (code − 1)·step)``."""
    top = (1 << bits) - 1
    step = (log_range[1] - log_range[0]) / max(top - 1, 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.where(codes > 0, torch.exp2(log_range[0] + (codes.float() - 1) * step),
                       torch.zeros_like(codes, dtype=torch.float32))
