"""Delta-DCT (arXiv 2503.06676): patch importance → 2/1/0-bit allocation → DCT → per-patch quantisation.

For each delta matrix: split into p×p patches, score each by its L2 norm, give the top share 2 bits,
the next 1 bit and drop the rest (ratios chosen so the average is the bit budget, 1 bit by default),
take the orthonormal 2-D DCT of each kept patch and quantise it uniformly between its min and max.
On load: dequantise → IDCT → rescale so the layer's mean |Δ̂| equals the original mean |Δ| (Eq. 6).
The ablation switches (``transform``, ``rescale``, ``patch_size``, ``ratios``, ``importance``)
are config fields, so a sweep is an override.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch

from .. import codec
from .. import patches as P
from ..errors import ConfigError
from ..graphs import GraphCache
from ..quant import RANGE_ENCODINGS
from . import register_method
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_choice, check_range, matrix_shape

PATCH_SIZES_HINT = (8, 16, 32, 64)


@dataclass
class DCTCodecConfig(MethodConfig):
    """The codec settings every Delta-DCT method shares (see :mod:`deltadct.codec`)."""

    #: side of the square patches (the paper uses 8, 16, 32, 64; any positive integer works)
    patch_size: int = 16
    #: per-patch transform: "dct" (the paper's 2-D DCT), "none", or "dct_rows" (1-D DCT along patch rows)
    transform: str = "dct"
    #: layer rescale on load: Eq. 6's mean |Δ| ("mean_abs"), a least-squares factor, or none
    rescale: str = "mean_abs"
    #: side information per kept patch: "fp16" min/max (the paper) or "log" codes on a per-layer scale
    range_encoding: str = "log"
    range_bits: int = 6

    def max_code_width(self) -> int:
        """The widest code a patch may get (sizes the allocation map)."""
        raise NotImplementedError

    def codec_options(self) -> dict:
        """Keyword arguments of :func:`deltadct.codec.encode_layer` / ``decode_layer``."""
        return dict(patch_size=self.patch_size, transform=self.transform, range_encoding=self.range_encoding,
                    range_bits=self.range_bits, max_width=self.max_code_width(), rescale=self.rescale)

    def validate(self) -> None:
        if self.patch_size < 1:
            raise ConfigError(f"option 'patch_size': {self.patch_size} must be a positive integer")
        check_choice("transform", self.transform, codec.TRANSFORMS)
        check_choice("rescale", self.rescale, ("mean_abs", "none", "lstsq"))
        check_choice("range_encoding", self.range_encoding, RANGE_ENCODINGS)
        check_range("range_bits", self.range_bits, 2, 8)


@dataclass
class DeltaDCTConfig(DCTCodecConfig):
    #: share of patches at each width in ``bit_widths`` (highest first); must sum to 1
    ratios: tuple[float, ...] = (0.2, 0.6, 0.2)
    bit_widths: tuple[int, ...] = (2, 1, 0)
    #: average payload bits per parameter the ratios may spend (side information not included)
    budget: float = 1.0
    importance: str = "l2"
    #: rank patches within each layer, or across all layers (needs a planning pass)
    allocation: str = "layer"

    def max_code_width(self) -> int:
        return max(self.bit_widths)

    def validate(self) -> None:
        super().validate()
        if len(self.ratios) != len(self.bit_widths):
            raise ConfigError(f"option 'ratios': {list(self.ratios)} needs one share per bit width "
                              f"{list(self.bit_widths)}")
        if any(r < 0 for r in self.ratios):
            raise ConfigError(f"option 'ratios': {list(self.ratios)} has a negative share")
        if abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ConfigError(f"option 'ratios': {list(self.ratios)} sums to {sum(self.ratios):.6g}, not 1")
        widths = list(self.bit_widths)
        if any(not 0 <= b <= 8 for b in widths) or widths != sorted(widths, reverse=True):
            raise ConfigError(f"option 'bit_widths': {list(self.bit_widths)} must be distinct-or-equal widths "
                              "in 0..8, highest first")
        check_range("budget", self.budget, 0.0, 8.0, lo_open=True)
        spent = sum(r * b for r, b in zip(self.ratios, self.bit_widths, strict=True))
        if spent > self.budget + 1e-6:
            raise ConfigError(f"option 'ratios': {list(self.ratios)} spend {spent:.4g} bits/param, "
                              f"over the budget of {self.budget:g}")
        check_choice("importance", self.importance, P.IMPORTANCE_METRICS)
        check_choice("allocation", self.allocation, ("layer", "global"))


def ratios_for_bits(ratios: tuple[float, ...], bit_widths: tuple[int, ...], bits: float) -> tuple[float, ...]:
    """Shares at each width that spend ``bits`` per parameter on codes, on a path through ``ratios``.

    Below what ``ratios`` spend, patches move in proportion from that mix to the lowest width (with
    a 0 width the kept shares shrink together: (0.2, 0.6, 0.2) at 2/1/0 bits becomes (0.1, 0.3, 0.6)
    at 0.5 bit); above it, to the highest width, until every patch is there. ``bit_widths`` is
    highest first, as the config keeps it.
    """
    spent = sum(r * b for r, b in zip(ratios, bit_widths, strict=True))
    if bits <= spent:
        end, reach = len(bit_widths) - 1, spent - bit_widths[-1]
    else:
        end, reach = 0, bit_widths[0] - spent
    move = min(1.0, abs(bits - spent) / reach) if reach > 0 else 0.0
    shares = [(1.0 - move) * r for r in ratios]
    shares[end] += move
    return tuple(shares)


@register_method
class DeltaDCT(Method):
    name = "deltadct"
    Config = DeltaDCTConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._global_widths: dict[str, torch.Tensor] | None = None

    @property
    def needs_plan(self) -> bool:  # type: ignore[override]
        return self.config.allocation == "global"

    def size_knob(self) -> SizeKnob | None:
        """The bits spent on codes, realised by :func:`ratios_for_bits` with the widths as configured."""
        c = self.config
        low, high = min(c.bit_widths), max(c.bit_widths)
        if low == high:
            return None
        return SizeKnob("budget", low + 0.01 * (high - low), float(high),
                        lambda v: {"budget": v, "ratios": ratios_for_bits(c.ratios, c.bit_widths, v)})

    def codec_options(self) -> dict:
        return self.config.codec_options()

    def check_shape(self, shape: tuple[int, ...], name: str = "") -> None:
        m, n = matrix_shape(shape)
        if self.config.patch_size > m or self.config.patch_size > n:
            raise ConfigError(f"patch_size {self.config.patch_size} is larger than tensor "
                              f"{name or '<delta>'} of shape {tuple(shape)} (as a {m}×{n} matrix)")

    def scores(self, matrix: torch.Tensor) -> torch.Tensor:
        return P.importance(P.patchify(matrix, self.config.patch_size), self.config.importance)

    def plan(self, deltas: Iterable[tuple[str, torch.Tensor]], *, header_bytes: int = 0) -> None:
        """Global allocation: rank every patch of every layer together and keep each layer's widths.

        Widths are stored per patch (one byte per p×p patch) rather than as score thresholds, so tied
        scores (e.g. the all-zero patches of a frozen layer) cannot push the counts past the ratios.
        """
        if not self.needs_plan:
            return
        names, scores = [], []
        for name, delta in deltas:
            names.append(name)
            scores.append(self.scores(as_matrix(delta.float())).cpu())
        all_scores = torch.cat(scores)
        counts = P.allocation_counts(all_scores.numel(), self.config.ratios)
        widths = P.allocate(all_scores, counts, self.config.bit_widths)
        self._global_widths = dict(zip(names, widths.split([s.numel() for s in scores]), strict=True))

    def widths_for(self, scores: torch.Tensor, name: str = "") -> tuple[torch.Tensor, list[int]]:
        """Each patch's width, and the number of patches at each width ``0..max(bit_widths)``.

        The counts come from the host (the ratios, or the planned widths kept on the CPU), so the
        encoder never has to read them back from the device.
        """
        c = self.config
        max_width = max(c.bit_widths)
        if c.allocation == "global":
            planned = (self._global_widths or {}).get(name)
            if planned is None or planned.numel() != scores.numel():
                raise ConfigError(f"allocation='global' needs plan() over all deltas (including {name!r}) "
                                  "before compress()")
            return planned.to(scores.device), torch.bincount(planned.long(), minlength=max_width + 1).tolist()
        counts = P.allocation_counts(scores.numel(), c.ratios)
        width_counts = [0] * (max_width + 1)
        for b, count in zip(c.bit_widths, counts, strict=True):
            width_counts[b] += count
        return P.allocate(scores, counts, c.bit_widths), width_counts

    def _graphed(self, device: torch.device, rows_cols: tuple[int, int]) -> bool:
        """Whether this layer's encode/decode replay as CUDA graphs (see :mod:`deltadct.graphs`).

        Per-layer allocation only: its width counts follow from the shape, so nothing in the layer
        waits for the host; a global plan's widths are host tensors that differ per layer.
        """
        c = self.config
        options = self.codec_options()
        return (codec.use_cuda_graphs and c.allocation == "layer"
                and codec.graph_capturable(device, rows_cols, patch_size=c.patch_size,
                                           bit_widths=tuple(c.bit_widths), rescale=c.rescale, transform=c.transform,
                                           quantizer=options.get("quantizer", "minmax"),
                                           dc_bits=options.get("dc_bits", 0))
                and not torch.cuda.is_current_stream_capturing())

    def _encode(self, delta: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        matrix = as_matrix(delta.float())
        widths, width_counts = self.widths_for(self.scores(matrix), name)
        return codec.encode_layer(matrix, widths, width_counts=width_counts, **self.codec_options())

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        self.check_shape(tuple(delta.shape), name)
        if self._graphed(delta.device, matrix_shape(tuple(delta.shape))):
            return Compressed(self._graph_cache.run("encode", self._encode, delta))
        return Compressed(self._encode(delta, name))

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        rows_cols = matrix_shape(tuple(shape))
        fields = compressed.tensors
        options = self.codec_options()
        if self._graphed(fields["alloc"].device, rows_cols):
            names = tuple(fields)
            # the rescale multiply doubles as the copy out of the graph's static output
            out = self._graph_cache.run(
                ("decode", names, rows_cols),
                lambda *values: codec.decode_layer_unscaled(dict(zip(names, values, strict=True)), rows_cols,
                                                            **options),
                *fields.values(),
                finish=lambda parts: parts[0].clone() if parts[1] is None else parts[0] * parts[1])
        else:
            out = codec.decode_layer(fields, rows_cols, **options)
        return out.reshape(tuple(shape))

    @functools.cached_property
    def _graph_cache(self) -> GraphCache:
        return GraphCache()
