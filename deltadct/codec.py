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

With a zero-centred ``quantizer`` (``symmetric``, ``lloyd``) a kept patch stores one scale instead
of a range: ``patch_scale`` (fp16) or ``scale_codes`` + ``log_scale`` (log codes), and its codes
index fixed levels × that scale. With ``dc_bits`` > 0 the DC coefficient of each kept patch is
taken out of the patch before quantisation and stored as ``dc_codes`` (``dc_bits``-bit signed
uniform codes) on a per-layer ``dc_scale``; the patch's codes then cover its p² − 1 other coefficients.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

from . import patches as P
from . import quant as Q
from .transforms import dct2, dct_rows, idct2, idct_rows

log = logging.getLogger(__name__)

#: per-patch transforms: the paper's 2-D DCT, none (raw values), or a 1-D DCT along each patch row
TRANSFORMS = ("dct", "none", "dct_rows")
#: the settings the fused kernels implement; any other runs on the torch path on every device
FUSED_TRANSFORMS = ("dct", "none")
#: widest code per quantiser (Lloyd–Max levels are tabulated from 1 to 4 bits)
QUANTIZER_MAX_BITS = {"minmax": 8, "symmetric": 8, "lloyd": 4}


#: CUDA tensors take the fused Triton kernels of :mod:`deltadct.kernels` where they apply; False
#: forces the torch path on every device (the reference the kernels are checked against)
use_fused_kernels = True
#: where the fused path applies, methods replay each matrix shape's encode/decode as one CUDA graph
#: (:mod:`deltadct.graphs`); False issues its ops one by one (same bytes, more host time)
use_cuda_graphs = True


@functools.lru_cache(maxsize=1)
def _load_kernels():
    try:
        from . import kernels
    except ImportError:  # no Triton (CPU-only installs): the torch path serves every device
        return None
    return kernels


@functools.lru_cache(maxsize=None)
def _log_torch_fallback(transform: str, quantizer: str, dc_bits: int) -> None:
    log.info("deltadct: transform=%s, quantizer=%s, dc_bits=%d run on the torch path on CUDA (the fused "
             "kernels implement the paper's min/max quantiser with transform dct or none only)",
             transform, quantizer, dc_bits)


def fused_settings(transform: str, quantizer: str = "minmax", dc_bits: int = 0) -> bool:
    """Whether the fused kernels implement these codec settings (else the torch path runs)."""
    return transform in FUSED_TRANSFORMS and quantizer == "minmax" and dc_bits == 0


def _fused_kernels(device: torch.device, shape: tuple[int, int], patch_size: int, max_width: int,
                   transform: str = "dct", quantizer: str = "minmax", dc_bits: int = 0):
    """The kernels module when the fused path applies to this layer, else None."""
    if not (use_fused_kernels and device.type == "cuda"):
        return None
    if not fused_settings(transform, quantizer, dc_bits):
        _log_torch_fallback(transform, quantizer, dc_bits)
        return None
    kernels = _load_kernels()
    return kernels if kernels is not None and kernels.supports(shape, patch_size, max_width) else None


def graph_capturable(device: torch.device, shape: tuple[int, int], *, patch_size: int,
                     bit_widths: tuple[int, ...], rescale: str, transform: str = "dct",
                     quantizer: str = "minmax", dc_bits: int = 0) -> bool:
    """Whether encoding and decoding this layer never wait for the host, given the width counts.

    True when both run on the fused kernels: every width fills whole bytes and the rescale does not
    need the reconstruction (least squares takes the torch path). Such a layer can be replayed as a
    CUDA graph when the caller passes ``width_counts`` to :func:`encode_layer`.
    """
    kernels = _fused_kernels(device, shape, patch_size, max(bit_widths, default=0), transform, quantizer, dc_bits)
    return (kernels is not None and rescale != "lstsq"
            and all(b == 0 or b in kernels.PACKED_WIDTHS for b in bit_widths))


def alloc_bits_for(max_width: int) -> int:
    """Bits needed to store a per-patch width in ``0..max_width``."""
    return max(1, math.ceil(math.log2(max_width + 1)))


def to_patches(matrix: torch.Tensor, patch_size: int, transform: str) -> torch.Tensor:
    """(m, n) → (N, p·p) rows to quantise: DCT coefficients, or raw values when transform='none'."""
    blocks = P.patchify(matrix, patch_size)
    if transform == "dct":
        blocks = dct2(blocks)
    elif transform == "dct_rows":
        blocks = dct_rows(blocks)
    return blocks.reshape(blocks.shape[0], -1)


def from_patches(rows: torch.Tensor, shape: tuple[int, int], patch_size: int, transform: str) -> torch.Tensor:
    blocks = rows.reshape(-1, patch_size, patch_size)
    if transform == "dct":
        blocks = idct2(blocks)
    elif transform == "dct_rows":
        blocks = idct_rows(blocks)
    return P.unpatchify(blocks, shape)


def _encode_ranges(lo: torch.Tensor, hi: torch.Tensor, encoding: str, range_bits: int):
    if encoding == "fp16":
        return Q.encode_range_fp16(lo, hi)
    return Q.encode_range_log(lo, hi, range_bits)


def _decode_ranges(fields: dict[str, torch.Tensor], count: int, encoding: str, range_bits: int):
    if encoding == "fp16":
        return Q.decode_range_fp16(fields, count)
    return Q.decode_range_log(fields, count, range_bits)


def _width_groups(widths: torch.Tensor, max_width: int, width_counts: list[int] | None = None
                  ) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Row order grouped by width (highest first, patch order inside a group) and each group's slice.

    One stable sort and one small host read (the count per width, unless the caller already has it
    in ``width_counts``) replace a ``nonzero`` per width, so a layer costs at most one device→host
    sync wherever it runs.
    """
    order = torch.sort(widths, descending=True, stable=True).indices
    counts = width_counts if width_counts is not None else \
        torch.bincount(widths.to(torch.int64), minlength=max_width + 1).tolist()
    groups, start = [], 0
    for b in range(max_width, 0, -1):
        if counts[b]:
            groups.append((b, start, start + counts[b]))
            start += counts[b]
    return order, groups


def _scatter_kept(values: torch.Tensor, kept_mask: torch.Tensor) -> torch.Tensor:
    """Spread per-kept-row values (patch order) to all rows, 0 for dropped rows, without a sync."""
    slot = (torch.cumsum(kept_mask, 0) - 1).clamp_(min=0)
    return torch.where(kept_mask, values[slot], torch.zeros((), dtype=values.dtype, device=values.device))


def _encode_scales(scales: torch.Tensor, encoding: str, bits: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if encoding == "fp16":
        stored = scales.to(torch.float16)
        return {"patch_scale": stored}, stored.float()
    return Q.encode_scale_log(scales, bits)


def _decode_scales(fields: dict[str, torch.Tensor], count: int, encoding: str, bits: int) -> torch.Tensor:
    if encoding == "fp16":
        return fields["patch_scale"].float()
    return Q.decode_scale_log(fields, count, bits)


def _quantize_rows_scaled(rows: torch.Tensor, fields: dict[str, torch.Tensor], order: torch.Tensor,
                          groups: list[tuple[int, int, int]], kept_mask: torch.Tensor, *, quantizer: str,
                          range_encoding: str, range_bits: int, dequantized: bool
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """:func:`quantize_rows` for a zero-centred quantiser: per kept row one fitted scale (coded as
    side information, in patch order) and codes on that width's unit levels × the *decoded* scale."""
    slot = torch.cumsum(kept_mask, 0) - 1  # each kept row's place in the side information
    scales = torch.zeros(groups[-1][2], dtype=torch.float32, device=rows.device)
    for b, a, z in groups:
        scales[slot[order[a:z]]] = Q.fit_scale(rows[order[a:z]], Q.unit_levels(quantizer, b))
    scale_fields, decoded = _encode_scales(scales, range_encoding, range_bits)
    fields.update(scale_fields)
    out = torch.zeros_like(rows) if dequantized else None
    for b, a, z in groups:
        rows_b, levels = order[a:z], Q.unit_levels(quantizer, b)
        codes = Q.nearest_level(rows[rows_b], decoded[slot[rows_b]], levels)
        fields[f"codes{b}"] = Q.pack_bits(codes, b)
        if out is not None:
            out[rows_b] = Q.dequantize_levels(codes, decoded[slot[rows_b]], levels, rows.dtype)
    return fields, out


def quantize_rows(rows: torch.Tensor, widths: torch.Tensor, *, range_encoding: str, range_bits: int,
                  max_width: int, dequantized: bool = True, width_counts: list[int] | None = None,
                  quantizer: str = "minmax") -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Quantise each row at its width; return the packed fields and (if asked) the dequantised rows.

    Rows with width 0 are dropped (dequantised to 0) and cost no side information. With the
    min/max quantiser all rows are quantised in one pass with per-row levels and only the uint8
    codes are regrouped by width; a zero-centred quantiser works width group by width group.
    """
    fields: dict[str, torch.Tensor] = {"alloc": Q.pack_bits(widths, alloc_bits_for(max_width))}
    order, groups = _width_groups(widths, max_width, width_counts)
    if not groups:
        return fields, (torch.zeros_like(rows) if dequantized else None)
    num_kept = groups[-1][2]
    kept_mask = widths > 0
    if quantizer != "minmax":
        return _quantize_rows_scaled(rows, fields, order, groups, kept_mask, quantizer=quantizer,
                                     range_encoding=range_encoding, range_bits=range_bits, dequantized=dequantized)
    kept = order[:num_kept].sort().values  # kept rows in patch order
    range_fields, lo, hi = _encode_ranges(rows.amin(dim=1)[kept], rows.amax(dim=1)[kept],
                                          range_encoding, range_bits)
    fields.update(range_fields)
    lo_all, hi_all = _scatter_kept(lo, kept_mask), _scatter_kept(hi, kept_mask)
    codes = Q.quantize(rows, lo_all, hi_all, widths)
    for b, a, z in groups:
        fields[f"codes{b}"] = Q.pack_bits(codes[order[a:z]], b)
    return fields, (Q.dequantize(codes, lo_all, hi_all, widths, rows.dtype) if dequantized else None)


def dequantize_rows(fields: dict[str, torch.Tensor], num_rows: int, row_len: int, *, range_encoding: str,
                    range_bits: int, max_width: int, dtype: torch.dtype = torch.float32,
                    quantizer: str = "minmax") -> torch.Tensor:
    """Inverse of :func:`quantize_rows` from the stored fields alone."""
    device = fields["alloc"].device
    widths = Q.unpack_bits(fields["alloc"], alloc_bits_for(max_width), num_rows)
    order, groups = _width_groups(widths, max_width)
    if not groups:
        return torch.zeros(num_rows, row_len, dtype=dtype, device=device)
    kept_mask = widths > 0
    if quantizer != "minmax":
        slot = torch.cumsum(kept_mask, 0) - 1
        scales = _decode_scales(fields, groups[-1][2], range_encoding, range_bits)
        out = torch.zeros(num_rows, row_len, dtype=dtype, device=device)
        for b, a, z in groups:
            codes = Q.unpack_bits(fields[f"codes{b}"], b, (z - a) * row_len).reshape(-1, row_len)
            out[order[a:z]] = Q.dequantize_levels(codes, scales[slot[order[a:z]]], Q.unit_levels(quantizer, b), dtype)
        return out
    lo, hi = _decode_ranges(fields, groups[-1][2], range_encoding, range_bits)
    codes = torch.zeros(num_rows, row_len, dtype=torch.uint8, device=device)
    for b, a, z in groups:
        codes[order[a:z]] = Q.unpack_bits(fields[f"codes{b}"], b, (z - a) * row_len).reshape(-1, row_len)
    return Q.dequantize(codes, _scatter_kept(lo, kept_mask), _scatter_kept(hi, kept_mask), widths, dtype)


def _split_dc(rows: torch.Tensor, widths: torch.Tensor, dc_bits: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The DC coefficient (entry 0) of each kept row as signed ``dc_bits``-bit codes on the layer's
    largest |DC|, and the rows without it."""
    dc = rows[widths > 0, 0].float()
    top = (1 << (dc_bits - 1)) - 1  # codes 0..2·top, code top = 0
    scale = dc.abs().amax() if dc.numel() else rows.new_zeros((), dtype=torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (torch.round(dc / safe * top) + top).clamp(0, 2 * top).to(torch.uint8)
    return {"dc_codes": Q.pack_bits(codes, dc_bits), "dc_scale": scale.reshape(1)}, rows[:, 1:]


def _join_dc(fields: dict[str, torch.Tensor], rows: torch.Tensor, widths: torch.Tensor, dc_bits: int) -> torch.Tensor:
    """Inverse of :func:`_split_dc`: the rows with their decoded DC put back in front (0 for dropped rows)."""
    kept_mask = widths > 0
    top = (1 << (dc_bits - 1)) - 1
    codes = Q.unpack_bits(fields["dc_codes"], dc_bits, int(kept_mask.sum()))
    dc = (codes.float() - top) * (fields["dc_scale"].float().reshape(()) / top)
    return torch.cat([_scatter_kept(dc, kept_mask).to(rows.dtype).unsqueeze(1), rows], dim=1)


def rescale_target(delta: torch.Tensor, approx: torch.Tensor | None, mode: str) -> torch.Tensor | None:
    """What to store for the layer's rescale: mean |Δ| (paper Eq. 6), the least-squares factor, or nothing."""
    if mode == "mean_abs":
        return delta.abs().mean().reshape(1).float()
    if mode == "lstsq":
        denom = (approx * approx).sum()
        factor = torch.where(denom > 0, (delta * approx).sum() / denom, 1.0)  # no host sync
        return factor.reshape(1).float()
    return None


def rescale_factor(approx: torch.Tensor, stored: torch.Tensor | None, mode: str,
                   abs_sum: torch.Tensor | None = None) -> torch.Tensor | None:
    """Eq. 6: the factor that makes the reconstruction's mean |Δ̂| the stored mean |Δ| (or the stored
    least-squares factor); None when nothing is rescaled.

    ``abs_sum``: Σ|Δ̂| when the decoder already has it, saving a pass over ``approx``.
    """
    if stored is None or mode == "none":
        return None
    value = stored.to(approx.dtype).reshape(())
    if mode == "mean_abs":
        current = approx.abs().mean() if abs_sum is None else abs_sum / approx.numel()
        return torch.where(current > 0, value / current, 1.0)  # no host sync
    return value


def _encode_fused(kernels, matrix: torch.Tensor, widths: torch.Tensor, *, patch_size: int, transform: str,
                  range_encoding: str, range_bits: int, max_width: int,
                  width_counts: list[int] | None) -> dict[str, torch.Tensor] | None:
    """:func:`quantize_rows` of :func:`to_patches` through the kernels; None if a width is not byte-packable."""
    ranks = kernels.width_ranks(widths, max_width)
    # field sizes; read back from the device (the layer's one sync) only if the caller does not know them
    counts = width_counts if width_counts is not None else ranks[:, -1].tolist()
    if any(counts[b] and b not in kernels.PACKED_WIDTHS for b in range(1, max_width + 1)):
        return None
    fields: dict[str, torch.Tensor] = {"alloc": Q.pack_bits(widths, alloc_bits_for(max_width))}
    num_kept = sum(counts[1:])
    if num_kept:
        options = dict(patch_size=patch_size, transform=transform)
        lo, hi = kernels.kept_ranges(matrix, widths, ranks, num_kept, **options)
        range_fields, lo, hi = _encode_ranges(lo, hi, range_encoding, range_bits)
        fields.update(range_fields)
        fields.update(kernels.encode_codes(matrix, widths, ranks, lo.contiguous(), hi.contiguous(), counts,
                                           max_width=max_width, **options))
    return fields


def encode_layer(matrix: torch.Tensor, widths: torch.Tensor, *, patch_size: int, transform: str,
                 range_encoding: str, range_bits: int, max_width: int, rescale: str,
                 width_counts: list[int] | None = None, quantizer: str = "minmax",
                 dc_bits: int = 0) -> dict[str, torch.Tensor]:
    """Compress one (m, n) float matrix given the width of each of its patches.

    ``width_counts``: the number of patches at each width ``0..max_width`` (the histogram of
    ``widths``) when the caller knows it on the host; it spares the device→host read that would
    otherwise stall a CUDA stream once per layer. ``quantizer`` and ``dc_bits``: see the module
    docstring; settings the fused kernels do not implement take the torch path on CUDA too.
    """
    fields, approx = None, None
    # the least-squares rescale needs the reconstruction, which only the torch path builds
    kernels = (_fused_kernels(matrix.device, tuple(matrix.shape), patch_size, max_width, transform, quantizer, dc_bits)
               if rescale != "lstsq" else None)
    if kernels is not None:
        fields = _encode_fused(kernels, matrix.contiguous(), widths, patch_size=patch_size, transform=transform,
                               range_encoding=range_encoding, range_bits=range_bits, max_width=max_width,
                               width_counts=width_counts)
    if fields is None:
        rows = to_patches(matrix, patch_size, transform)
        dc_fields: dict[str, torch.Tensor] = {}
        if dc_bits:
            dc_fields, rows = _split_dc(rows, widths, dc_bits)
        # only the least-squares rescale looks at the reconstruction; mean |Δ| needs the delta alone
        fields, dequant = quantize_rows(rows, widths, range_encoding=range_encoding, range_bits=range_bits,
                                        max_width=max_width, dequantized=rescale == "lstsq",
                                        width_counts=width_counts, quantizer=quantizer)
        fields.update(dc_fields)
        if dequant is not None:
            if dc_bits:
                dequant = _join_dc(fields, dequant, widths, dc_bits)
            approx = from_patches(dequant, tuple(matrix.shape), patch_size, transform)
    if rescale != "none":
        fields["scale"] = rescale_target(matrix, approx, rescale)
    return fields


def _decode_fused(kernels, fields: dict[str, torch.Tensor], shape: tuple[int, int], *, patch_size: int,
                  transform: str, range_encoding: str, range_bits: int,
                  max_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dequantize_rows` + :func:`from_patches` through the kernels, with no device→host sync."""
    gr, gc = P.patch_grid(shape, patch_size)
    widths = Q.unpack_bits(fields["alloc"], alloc_bits_for(max_width), gr * gc)
    # the number of kept patches follows from the stream sizes, each patch's codes filling whole bytes
    num_kept = sum(fields[k].numel() * 8 // (int(k[5:]) * patch_size * patch_size) for k in fields
                   if k.startswith("codes"))
    if not num_kept:
        zeros = torch.zeros(shape, dtype=torch.float32, device=widths.device)
        return zeros, zeros.sum()
    lo, hi = _decode_ranges(fields, num_kept, range_encoding, range_bits)
    return kernels.decode(fields, widths, kernels.width_ranks(widths, max_width), lo.contiguous(), hi.contiguous(),
                          shape, patch_size=patch_size, transform=transform, max_width=max_width)


def decode_layer_unscaled(fields: dict[str, torch.Tensor], shape: tuple[int, int], *, patch_size: int,
                          transform: str, range_encoding: str, range_bits: int, max_width: int,
                          rescale: str, quantizer: str = "minmax",
                          dc_bits: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`decode_layer` before its last step: the reconstruction and its rescale factor (or None).

    Kept apart so that a caller who copies the result anyway (a CUDA graph's static output) can fold
    the rescale into that copy instead of paying a pass of its own.
    """
    options = dict(patch_size=patch_size, transform=transform, range_encoding=range_encoding,
                   range_bits=range_bits, max_width=max_width)
    kernels = _fused_kernels(fields["alloc"].device, shape, patch_size, max_width, transform, quantizer, dc_bits)
    if kernels is not None and all(int(k[5:]) in kernels.PACKED_WIDTHS for k in fields if k.startswith("codes")):
        approx, abs_sum = _decode_fused(kernels, fields, shape, **options)
        return approx, rescale_factor(approx, fields.get("scale"), rescale, abs_sum)
    gr, gc = P.patch_grid(shape, patch_size)
    rows = dequantize_rows(fields, gr * gc, patch_size * patch_size - (1 if dc_bits else 0),
                           range_encoding=range_encoding, range_bits=range_bits, max_width=max_width,
                           quantizer=quantizer)
    if dc_bits:
        rows = _join_dc(fields, rows, Q.unpack_bits(fields["alloc"], alloc_bits_for(max_width), gr * gc), dc_bits)
    approx = from_patches(rows, shape, patch_size, transform)
    return approx, rescale_factor(approx, fields.get("scale"), rescale)


def decode_layer(fields: dict[str, torch.Tensor], shape: tuple[int, int], **options) -> torch.Tensor:
    """The (m, n) float32 reconstruction of one layer, rescaled; options as for :func:`encode_layer`."""
    approx, factor = decode_layer_unscaled(fields, shape, **options)
    return approx if factor is None else approx * factor
