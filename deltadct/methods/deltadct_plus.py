"""Delta-DCT+: the Delta-DCT codec with the options that measured best beyond the paper.

Same patch pipeline as ``deltadct`` (L2 patch ranking, fixed shares per width, per-patch transform,
per-patch quantisation, layer rescale), plus:

- ``quantizer``: ``minmax`` (the paper's uniform grid between a patch's min and max, two side-info
  numbers per patch), ``symmetric`` (levels evenly spaced about zero) or ``lloyd`` (Gaussian
  Lloyd–Max levels), both × one least-squares-fitted scale per patch (one side-info number; at
  1 bit both are sign × mean |coefficient|);
- ``dc_bits``: the DC coefficient of every kept patch coded apart on a per-layer grid;
- ``transform``: also ``dct_rows`` (1-D DCT along patch rows);
- ``lowrank_bits``: a low-rank head first. The delta's top singular directions are stored as in
  data-free Delta-CoMe (``deltadct.methods.delta_come_rtn``: mixed-precision singular vectors, sized to
  ``lowrank_bits`` per parameter) and the patch codec compresses the residual Δ − head.

File fields: the head's (``head_range``, ``head_codes``) and the codec's (:mod:`deltadct.codec`).
A file's size is head + patch codes + side information; ``budget`` bounds the patch codes only.
The defaults are the combination chosen by ``experiments/deltadct_plus_study.py`` (see
``results/deltadct_plus/README.md``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import codec
from ..errors import ConfigError
from ..quant import QUANTIZERS
from . import register_method
from .base import Compressed, as_matrix, check_choice, check_range, matrix_shape
from .delta_come_rtn import DeltaCoMeRTN
from .deltadct import DeltaDCT, DeltaDCTConfig

HEAD_PREFIX = "head_"


@dataclass
class DeltaDCTPlusConfig(DeltaDCTConfig):
    # the defaults (1 bit/param of payload: 0.5 in the head, 0.5 in 1-/2-bit patches of the
    # residual, 60 % of them dropped) are the study's choice; see results/deltadct_plus/README.md
    ratios: tuple[float, ...] = (0.1, 0.3, 0.6)
    transform: str = "none"
    rescale: str = "none"
    #: per-patch levels: "minmax" (the paper's), "symmetric" or "lloyd" (zero-centred × one scale)
    quantizer: str = "symmetric"
    #: bits of each kept patch's separately coded DC coefficient (0: coded with the patch); dct only
    dc_bits: int = 0
    #: bits per parameter spent on the low-rank head (0: none), on top of the patch codes
    lowrank_bits: float = 0.5

    def codec_options(self) -> dict:
        return {**super().codec_options(), "quantizer": self.quantizer, "dc_bits": self.dc_bits}

    def validate(self) -> None:
        super().validate()
        check_choice("quantizer", self.quantizer, QUANTIZERS)
        limit = codec.QUANTIZER_MAX_BITS[self.quantizer]
        if max(self.bit_widths) > limit:
            raise ConfigError(f"option 'bit_widths': {list(self.bit_widths)} exceed the {limit} bits the "
                              f"{self.quantizer!r} quantizer supports")
        if self.dc_bits and not 2 <= self.dc_bits <= 8:
            raise ConfigError(f"option 'dc_bits': {self.dc_bits} must be 0 (off) or in 2..8")
        if self.dc_bits and self.transform != "dct":
            raise ConfigError(f"option 'dc_bits': {self.dc_bits} needs transform 'dct' (a DC coefficient), "
                              f"not {self.transform!r}")
        check_range("lowrank_bits", self.lowrank_bits, 0.0, 8.0)


@register_method
class DeltaDCTPlus(DeltaDCT):
    name = "deltadct_plus"
    Config = DeltaDCTPlusConfig

    @functools.cached_property
    def _head(self) -> DeltaCoMeRTN | None:
        bits = self.config.lowrank_bits
        return DeltaCoMeRTN(bits=bits) if bits > 0 else None

    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        if self._head is None:
            return super().compress(delta, name=name)
        self.check_shape(tuple(delta.shape), name)
        matrix = as_matrix(delta.float())
        head = self._head.compress(matrix, name=name)
        residual = matrix - self._head.reconstruct(head, matrix.shape)
        fields = {HEAD_PREFIX + k: v for k, v in head.tensors.items()}
        return Compressed({**fields, **super().compress(residual, name=name).tensors})

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        if self._head is None:
            return super().reconstruct(compressed, shape)
        rows_cols = matrix_shape(tuple(shape))
        head = {k[len(HEAD_PREFIX):]: v for k, v in compressed.tensors.items() if k.startswith(HEAD_PREFIX)}
        rest = {k: v for k, v in compressed.tensors.items() if not k.startswith(HEAD_PREFIX)}
        out = self._head.reconstruct(Compressed(head), rows_cols) + super().reconstruct(Compressed(rest), rows_cols)
        return out.reshape(tuple(shape))
