"""The Delta-DCT codec as pure, batched tensor functions (no Python loop over patches).

``encode_layer``: matrix → patches → (optional) DCT → per-patch bit widths given → per-patch
uniform quantisation at that width, ranges coded as side information → packed bit streams.
``decode_layer``: the exact inverse up to quantisation. Bit widths per patch come from the caller
(fixed ratios in ``methods/deltadct.py``, rate–distortion search in ``methods/deltadct_auto.py``),
so both methods share one file layout and one reconstruct path.

Layout of the fields one layer writes:

``alloc``        packed per-patch bit widths (``alloc_bits`` bits each, row-major patch order)
``codes{b}``     packed ``b``-bit codes of every patch with width ``b``, in patch order
``range`` | ``range_codes`` + ``log_range``   per kept patch (patch order) its (lo, hi)
``scale``        fp32 scalar: the rescale target (mean |Δ|) or factor (least squares)
"""
from __future__ import annotations

import math

import torch

from . import patches as P
from . import quant as Q
from .transforms import dct2, idct2


def alloc_bits_for(max_width: int) -> int:
    """Bits needed to store a per-patch width in ``0..max_width``."""
    return max(1, math.ceil(math.log2(max_width + 1)))


def to_patches(matrix: torch.Tensor, patch_size: int, transform: str) -> torch.Tensor:
    """(m, n) → (N, p·p) rows to quantise: DCT coefficients, or raw values when transform='none'."""
    blocks = P.patchify(matrix, patch_size)
    if transform == "dct":
        blocks = dct2(blocks)
    return blocks.reshape(blocks.shape[0], -1)


def from_patches(rows: torch.Tensor, shape: tuple[int, int], patch_size: int, transform: str) -> torch.Tensor:
    blocks = rows.reshape(-1, patch_size, patch_size)
    if transform == "dct":
        blocks = idct2(blocks)
    return P.unpatchify(blocks, shape)


def _encode_ranges(lo: torch.Tensor, hi: torch.Tensor, encoding: str, range_bits: int):
    if encoding == "fp16":
        return Q.encode_range_fp16(lo, hi)
    return Q.encode_range_log(lo, hi, range_bits)


def _decode_ranges(fields: dict[str, torch.Tensor], count: int, encoding: str, range_bits: int):
    if encoding == "fp16":
        return Q.decode_range_fp16(fields, count)
    return Q.decode_range_log(fields, count, range_bits)


def quantize_rows(rows: torch.Tensor, widths: torch.Tensor, *, range_encoding: str, range_bits: int,
                  max_width: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Quantise each row at its width; return the packed fields and the dequantised rows.

    Rows with width 0 are dropped (dequantised to 0) and cost no side information.
    """
    fields: dict[str, torch.Tensor] = {"alloc": Q.pack_bits(widths, alloc_bits_for(max_width))}
    kept = torch.nonzero(widths > 0).squeeze(1)
    dequant = torch.zeros_like(rows)
    if kept.numel() == 0:
        return fields, dequant
    kept_rows = rows[kept]
    range_fields, lo, hi = _encode_ranges(kept_rows.amin(dim=1), kept_rows.amax(dim=1),
                                          range_encoding, range_bits)
    fields.update(range_fields)
    kept_widths = widths[kept]
    for b in range(1, max_width + 1):
        sel = torch.nonzero(kept_widths == b).squeeze(1)
        if sel.numel() == 0:
            continue
        codes = Q.quantize(kept_rows[sel], lo[sel], hi[sel], b)
        fields[f"codes{b}"] = Q.pack_bits(codes, b)
        dequant[kept[sel]] = Q.dequantize(codes, lo[sel], hi[sel], b, rows.dtype)
    return fields, dequant


def dequantize_rows(fields: dict[str, torch.Tensor], num_rows: int, row_len: int, *, range_encoding: str,
                    range_bits: int, max_width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` from the stored fields alone."""
    device = fields["alloc"].device
    widths = Q.unpack_bits(fields["alloc"], alloc_bits_for(max_width), num_rows)
    rows = torch.zeros(num_rows, row_len, dtype=dtype, device=device)
    kept = torch.nonzero(widths > 0).squeeze(1)
    if kept.numel() == 0:
        return rows
    lo, hi = _decode_ranges(fields, kept.numel(), range_encoding, range_bits)
    kept_widths = widths[kept]
    for b in range(1, max_width + 1):
        sel = torch.nonzero(kept_widths == b).squeeze(1)
        if sel.numel() == 0:
            continue
        codes = Q.unpack_bits(fields[f"codes{b}"], b, sel.numel() * row_len).reshape(-1, row_len)
        rows[kept[sel]] = Q.dequantize(codes, lo[sel], hi[sel], b, dtype)
    return rows


def rescale_target(delta: torch.Tensor, approx: torch.Tensor, mode: str) -> torch.Tensor | None:
    """What to store for the layer's rescale: mean |Δ| (paper Eq. 6), the least-squares factor, or nothing."""
    if mode == "mean_abs":
        return delta.abs().mean().reshape(1).float()
    if mode == "lstsq":
        denom = (approx * approx).sum()
        factor = (delta * approx).sum() / denom if denom > 0 else torch.ones((), device=delta.device)
        return factor.reshape(1).float()
    return None


def apply_rescale(approx: torch.Tensor, stored: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Eq. 6: scale the reconstruction so its mean |Δ̂| equals the stored mean |Δ| (or by the stored factor)."""
    if stored is None or mode == "none":
        return approx
    value = stored.to(approx.dtype).reshape(())
    if mode == "mean_abs":
        current = approx.abs().mean()
        return approx * (value / current) if current > 0 else approx
    return approx * value


def encode_layer(matrix: torch.Tensor, widths: torch.Tensor, *, patch_size: int, transform: str,
                 range_encoding: str, range_bits: int, max_width: int, rescale: str) -> dict[str, torch.Tensor]:
    """Compress one (m, n) float matrix given the width of each of its patches."""
    rows = to_patches(matrix, patch_size, transform)
    fields, dequant = quantize_rows(rows, widths, range_encoding=range_encoding,
                                    range_bits=range_bits, max_width=max_width)
    if rescale != "none":
        approx = from_patches(dequant, tuple(matrix.shape), patch_size, transform)
        fields["scale"] = rescale_target(matrix, approx, rescale)
    return fields


def decode_layer(fields: dict[str, torch.Tensor], shape: tuple[int, int], *, patch_size: int, transform: str,
                 range_encoding: str, range_bits: int, max_width: int, rescale: str) -> torch.Tensor:
    gr, gc = P.patch_grid(shape, patch_size)
    rows = dequantize_rows(fields, gr * gc, patch_size * patch_size, range_encoding=range_encoding,
                           range_bits=range_bits, max_width=max_width)
    approx = from_patches(rows, shape, patch_size, transform)
    return apply_rescale(approx, fields.get("scale"), rescale)
