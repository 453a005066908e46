"""Fused Triton kernels for the Delta-DCT codec on CUDA (imported by :mod:`deltadct.codec` only there).

The torch path in ``codec.py`` materialises every intermediate of a layer (the patch copy, the DCT
coefficients, per-row levels, float codes, uint8 codes regrouped by width, the bit planes) and
launches a few dozen kernels over them; at Llama-7B scale those launches and passes, not the
arithmetic, set its speed. Here one program reads a few neighbouring patches of one patch row
straight from the matrix's row-major layout (several per program, so their dependent loads overlap),
and per patch:

* ``_kept_range_kernel``: DCT → per-patch min/max, written at the patch's rank among kept patches;
* ``_encode_kernel``: DCT again (cheaper than storing the coefficients) → quantise at the patch's
  width → pack the codes into the bytes of its ``codes{b}`` stream;
* ``_decode_kernel``: unpack → dequantise → inverse DCT → write the tile in place, plus the tile's
  Σ|x̂| for the mean-|Δ̂| rescale.

Stream positions come from ``width_ranks`` (a cumulative count of each width over patch order), so
no kernel sorts or gathers. The layout, the quantiser (IEEE division, round half to even, the same
clamps) and the DCT in full float32 (``input_precision="ieee"``) are the torch path's; codes differ
only where a coefficient sits on a rounding boundary and the two DCTs' summation orders disagree.
Each patch's codes must fill whole bytes, hence the widths in :data:`PACKED_WIDTHS`, and
``tl.dot`` needs sides of at least 16, hence :data:`PATCH_SIZES`; other settings take the torch path.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .transforms import dct_matrix

PATCH_SIZES = (16, 32, 64)
PACKED_WIDTHS = (1, 2, 4, 8)
#: element offsets are int32 inside the kernels
MAX_NUMEL = 2**31 - 1
#: launch configuration per patch size, from benchmarks/tune_kernels.py on an H200 (11008×4096;
#: results/benchmarks/cuda-nvidia-h200-tune-kernels.txt): one warp per 16×16 or 32×32 patch is
#: fastest for all three kernels, 16×16 patches need several in flight per program to hide the
#: latency of their loads, and a 64×64 patch wants four warps
PATCHES_PER_PROGRAM = {16: 8, 32: 1, 64: 1}
NUM_WARPS = {16: 1, 32: 1, 64: 4}


def supports(matrix_shape: tuple[int, int], patch_size: int, max_width: int) -> bool:
    m, n = matrix_shape
    return patch_size in PATCH_SIZES and max_width <= 8 and -(-m // patch_size) * patch_size * n < MAX_NUMEL


@functools.lru_cache(maxsize=16)
def _basis(patch_size: int, device: torch.device) -> torch.Tensor:
    return dct_matrix(patch_size, dtype=torch.float32, device=device).contiguous()


def width_ranks(widths: torch.Tensor, max_width: int) -> torch.Tensor:
    """(max_width + 1, N) int32: ``ranks[b, i]`` = patches of width ``b`` among patches ``0..i``.

    ``ranks[w_i, i] − 1`` is patch ``i``'s slot in its ``codes{w}`` stream, ``i − ranks[0, i]`` its
    slot among kept patches (the order of the range fields), and the last column the counts per
    width. One flat scan over all rows, each row then shifted back by the totals of the rows
    before it: a scan along the last axis of a few long rows runs one block per row, an order of
    magnitude slower at Llama sizes.
    """
    levels = torch.arange(max_width + 1, dtype=widths.dtype, device=widths.device)
    onehot = (levels.unsqueeze(1) == widths).to(torch.int32)
    running = onehot.reshape(-1).cumsum(0, dtype=torch.int32).reshape(onehot.shape)
    return running - torch.cat([running.new_zeros(1), running[:-1, -1]]).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# device functions shared by the kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _patch(pid, k, tiles_c, gc, num_patches, widths_ptr, ranks_ptr, P: tl.constexpr, G: tl.constexpr):
    """Patch ``k`` of program ``pid``: coordinates, index, width, kept flag, kept slot, width slot."""
    pr = pid // tiles_c
    pc = (pid % tiles_c) * G + k
    valid = pc < gc
    idx = pr * gc + pc
    w = tl.load(widths_ptr + idx, mask=valid, other=0).to(tl.int32)
    kept = valid & (w > 0)
    kept_slot = idx - tl.load(ranks_ptr + idx, mask=kept, other=0)
    width_slot = tl.load(ranks_ptr + w * num_patches + idx, mask=kept, other=1) - 1
    r = pr * P + tl.arange(0, P)[:, None]
    c = pc * P + tl.arange(0, P)[None, :]
    return r, c, valid, w, kept, kept_slot, width_slot


@triton.jit
def _dct(x, fwd, back, INVERSE: tl.constexpr):
    # same association as transforms.dct2 / idct2: (C X) Cᵀ and (Cᵀ Y) C
    if INVERSE:
        return tl.dot(tl.dot(back, x, input_precision="ieee"), fwd, input_precision="ieee")
    else:
        return tl.dot(tl.dot(fwd, x, input_precision="ieee"), back, input_precision="ieee")


@triton.jit
def _dct_basis(basis_ptr, P: tl.constexpr):
    """The P×P DCT matrix C and its transpose, loaded once per program."""
    i = tl.arange(0, P)
    return tl.load(basis_ptr + i[:, None] * P + i[None, :]), tl.load(basis_ptr + i[None, :] * P + i[:, None])


@triton.jit
def _coefficients(x_ptr, stride, m, n, r, c, kept, fwd, back, DCT: tl.constexpr):
    """A kept patch as float32 (zero-padded past the matrix edge), DCT'd when ``DCT``."""
    x = tl.load(x_ptr + r * stride + c, mask=(r < m) & (c < n) & kept, other=0.0).to(tl.float32)
    if DCT:
        x = _dct(x, fwd, back, False)
    return x


@triton.jit
def _store_codes(out_ptr, q, slot, sel, B: tl.constexpr, P: tl.constexpr):
    RB: tl.constexpr = P * B // 8  # bytes per patch row
    if B == 8:
        packed = q.to(tl.uint8)
    else:
        # code j of a patch sits at bit j·B of its stream (LSB first), as quant.pack_bits writes it
        shift = tl.arange(0, 8 // B) * B
        packed = tl.sum(tl.reshape(q, (P, RB, 8 // B)) << shift[None, None, :], axis=2).to(tl.uint8)
    offsets = tl.arange(0, P)[:, None] * RB + tl.arange(0, RB)[None, :]
    tl.store(out_ptr + slot * (P * RB) + offsets, packed, mask=sel & (offsets >= 0))


@triton.jit
def _load_codes(in_ptr, slot, sel, B: tl.constexpr, P: tl.constexpr):
    j = tl.arange(0, P)[:, None] * P + tl.arange(0, P)[None, :]
    byte = tl.load(in_ptr + slot * (P * P * B // 8) + j // (8 // B), mask=sel & (j >= 0), other=0)
    return (byte.to(tl.int32) >> ((j % (8 // B)) * B)) & ((1 << B) - 1)


# ---------------------------------------------------------------------------------------------
# kernels: one program per G patches of a patch row
# ---------------------------------------------------------------------------------------------
@triton.jit
def _kept_range_kernel(x_ptr, stride, m, n, gc, tiles_c, num_patches, basis_ptr, widths_ptr, ranks_ptr,
                       lo_ptr, hi_ptr, P: tl.constexpr, G: tl.constexpr, DCT: tl.constexpr):
    pid = tl.program_id(0)
    fwd, back = _dct_basis(basis_ptr, P)
    for k in tl.static_range(G):
        r, c, valid, w, kept, kept_slot, width_slot = _patch(pid, k, tiles_c, gc, num_patches, widths_ptr,
                                                             ranks_ptr, P, G)
        x = _coefficients(x_ptr, stride, m, n, r, c, kept, fwd, back, DCT)
        tl.store(lo_ptr + kept_slot, tl.min(x), mask=kept)
        tl.store(hi_ptr + kept_slot, tl.max(x), mask=kept)


@triton.jit
def _encode_kernel(x_ptr, stride, m, n, gc, tiles_c, num_patches, basis_ptr, widths_ptr, ranks_ptr, lo_ptr,
                   hi_ptr, out1, out2, out4, out8, P: tl.constexpr, G: tl.constexpr, DCT: tl.constexpr,
                   MAX_WIDTH: tl.constexpr):
    pid = tl.program_id(0)
    fwd, back = _dct_basis(basis_ptr, P)
    for k in tl.static_range(G):
        r, c, valid, w, kept, kept_slot, width_slot = _patch(pid, k, tiles_c, gc, num_patches, widths_ptr,
                                                             ranks_ptr, P, G)
        x = _coefficients(x_ptr, stride, m, n, r, c, kept, fwd, back, DCT)
        lo = tl.load(lo_ptr + kept_slot, mask=kept, other=0.0)
        hi = tl.load(hi_ptr + kept_slot, mask=kept, other=0.0)
        # quant.quantize, operation for operation
        levels = ((1 << w) - 1).to(tl.float32)
        span = hi - lo
        step = tl.where(span > 0, tl.div_rn(span, tl.maximum(levels, 1.0)), 1.0)
        q = libdevice.rint(tl.div_rn(x - lo, step))
        q = tl.minimum(tl.maximum(q, 0.0), levels).to(tl.int32)
        if MAX_WIDTH >= 1:
            _store_codes(out1, q, width_slot, kept & (w == 1), 1, P)
        if MAX_WIDTH >= 2:
            _store_codes(out2, q, width_slot, kept & (w == 2), 2, P)
        if MAX_WIDTH >= 4:
            _store_codes(out4, q, width_slot, kept & (w == 4), 4, P)
        if MAX_WIDTH >= 8:
            _store_codes(out8, q, width_slot, kept & (w == 8), 8, P)


@triton.jit
def _decode_kernel(out_ptr, m, n, gc, tiles_c, num_patches, basis_ptr, widths_ptr, ranks_ptr, lo_ptr, hi_ptr,
                   in1, in2, in4, in8, abs_sum_ptr, P: tl.constexpr, G: tl.constexpr, DCT: tl.constexpr,
                   MAX_WIDTH: tl.constexpr):
    pid = tl.program_id(0)
    fwd, back = _dct_basis(basis_ptr, P)
    abs_sum = 0.0
    for k in tl.static_range(G):
        r, c, valid, w, kept, kept_slot, width_slot = _patch(pid, k, tiles_c, gc, num_patches, widths_ptr,
                                                             ranks_ptr, P, G)
        q = tl.zeros((P, P), dtype=tl.int32)
        if MAX_WIDTH >= 1:
            q += _load_codes(in1, width_slot, kept & (w == 1), 1, P)
        if MAX_WIDTH >= 2:
            q += _load_codes(in2, width_slot, kept & (w == 2), 2, P)
        if MAX_WIDTH >= 4:
            q += _load_codes(in4, width_slot, kept & (w == 4), 4, P)
        if MAX_WIDTH >= 8:
            q += _load_codes(in8, width_slot, kept & (w == 8), 8, P)
        lo = tl.load(lo_ptr + kept_slot, mask=kept, other=0.0)
        hi = tl.load(hi_ptr + kept_slot, mask=kept, other=0.0)
        # quant.dequantize; dropped patches have lo = hi = 0 and decode to zeros
        step = tl.div_rn(hi - lo, tl.maximum((1 << w) - 1, 1).to(tl.float32))
        x = lo + q.to(tl.float32) * step
        if DCT:
            x = _dct(x, fwd, back, True)
        inside = (r < m) & (c < n) & valid
        tl.store(out_ptr + r * n + c, x, mask=inside)
        abs_sum += tl.sum(tl.where(inside, tl.abs(x), 0.0))
    tl.store(abs_sum_ptr + pid, abs_sum)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _grid(shape: tuple[int, int], patch_size: int) -> tuple[int, int, int]:
    """(patch columns, programs per patch row, programs)."""
    gr, gc = -(-shape[0] // patch_size), -(-shape[1] // patch_size)
    tiles_c = -(-gc // PATCHES_PER_PROGRAM[patch_size])
    return gc, tiles_c, gr * tiles_c


def _constants(patch_size: int, transform: str) -> dict:
    return dict(P=patch_size, G=PATCHES_PER_PROGRAM[patch_size], DCT=transform == "dct",
                num_warps=NUM_WARPS[patch_size])


def kept_ranges(matrix: torch.Tensor, widths: torch.Tensor, ranks: torch.Tensor, num_kept: int, *,
                patch_size: int, transform: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each kept patch's coefficients, kept patches in patch order."""
    gc, tiles_c, programs = _grid(tuple(matrix.shape), patch_size)
    lo = torch.empty(num_kept, dtype=torch.float32, device=matrix.device)
    hi = torch.empty_like(lo)
    _kept_range_kernel[(programs,)](
        matrix, matrix.stride(0), matrix.shape[0], matrix.shape[1], gc, tiles_c, widths.numel(),
        _basis(patch_size, matrix.device), widths, ranks, lo, hi, **_constants(patch_size, transform))
    return lo, hi


def encode_codes(matrix: torch.Tensor, widths: torch.Tensor, ranks: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, counts: list[int], *, patch_size: int, transform: str,
                 max_width: int) -> dict[str, torch.Tensor]:
    """The packed ``codes{b}`` fields, highest width first; ``lo``/``hi`` are the decoded ranges."""
    gc, tiles_c, programs = _grid(tuple(matrix.shape), patch_size)
    row_bytes = patch_size * patch_size // 8
    fields = {f"codes{b}": torch.empty(counts[b] * row_bytes * b, dtype=torch.uint8, device=matrix.device)
              for b in range(max_width, 0, -1) if counts[b]}
    outs = [fields.get(f"codes{b}", widths) for b in PACKED_WIDTHS]  # absent widths are never written
    _encode_kernel[(programs,)](
        matrix, matrix.stride(0), matrix.shape[0], matrix.shape[1], gc, tiles_c, widths.numel(),
        _basis(patch_size, matrix.device), widths, ranks, lo, hi, *outs, MAX_WIDTH=max_width,
        **_constants(patch_size, transform))
    return fields


def decode(fields: dict[str, torch.Tensor], widths: torch.Tensor, ranks: torch.Tensor, lo: torch.Tensor,
           hi: torch.Tensor, shape: tuple[int, int], *, patch_size: int, transform: str,
           max_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (m, n) float32 reconstruction before rescaling, and its Σ|x̂|."""
    gc, tiles_c, programs = _grid(shape, patch_size)
    device = widths.device
    out = torch.empty(shape, dtype=torch.float32, device=device)
    partial = torch.empty(programs, dtype=torch.float32, device=device)
    ins = [fields.get(f"codes{b}", widths) for b in PACKED_WIDTHS]  # absent widths are never read
    _decode_kernel[(programs,)](
        out, shape[0], shape[1], gc, tiles_c, widths.numel(), _basis(patch_size, device), widths, ranks, lo, hi,
        *ins, partial, MAX_WIDTH=max_width, **_constants(patch_size, transform))
    return out, partial.sum()
