"""DeltaZip-style compression (Yao et al., "DeltaZip: Efficient Serving of Multiple Full-Model-Tuned
LLMs"; official code eth-easl/deltazip): the delta pruned to 2:4 structured sparsity and quantised
to 2 bits in one GPTQ/SparseGPT pass on calibration activations.

What it follows (the official ``SparseGPT.fasterprune`` applied to W_finetuned − W_base): the
Hessian H = 2·XᵀX/n of the layer inputs with damping 0.01·mean(diag H); columns in their natural
order (no act-order); in every run of 4 input columns, the 2 weights of each row with the least
w²/[H⁻¹]²_jj are set to zero (SparseGPT's mask selection, made as the columns are reached, on
weights already corrected for the earlier columns' errors); every weight is then rounded on an
asymmetric min/max grid with a zero point (pruned ones to exactly 0) and its error is spread over
the later columns. The grid is one per row, computed from the whole row before the first column,
as the official code does (``group_size`` 0); a positive ``group_size`` gives GPTQ-style groups.

Storage, where it departs: DeltaZip packs the dense codes and then compresses the file losslessly
(GDeflate); here only the kept codes are written, with the 2:4 pattern of each run of 4 as one of
its 6 patterns in 3 bits: 2 × ``bits`` + 3 bits per 4 entries (1.75 bits/param at 2 bits) plus one
fp16 scale and a ``bits``-bit zero point per row (or group). Matrices whose width is not a multiple
of 4 are padded with dead input columns, which the mask prunes first and which are not stored.
Hessians come from one pass through the fine-tuned model (:mod:`deltadct.calibration`); the official
code runs the model layer by layer with each layer's inputs taken through the compressed layers before it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..gptq import dequantize_asymmetric, gptq_quantize
from . import register_method
from ._gptq_storage import StreamReader, StreamWriter, check_hessian
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_range, matrix_shape

#: N:M sparsity: N of every M consecutive input columns are pruned in each row
PRUNE_N, PRUNE_M = 2, 4
#: the C(4, 2) = 6 ways to keep 2 of 4 entries, as rows of a 0/1 keep mask; a run's pattern is its row index
PATTERNS = torch.tensor([[int(j in kept) for j in range(PRUNE_M)]
                         for kept in itertools.combinations(range(PRUNE_M), PRUNE_M - PRUNE_N)], dtype=torch.bool)
PATTERN_BITS = 3
#: a run's keep mask read as a 4-bit number (entry j = bit j) → its pattern id (unused numbers: 0)
_PATTERN_ID = torch.zeros(1 << PRUNE_M, dtype=torch.long)
_PATTERN_ID[(PATTERNS.long() << torch.arange(PRUNE_M)).sum(1)] = torch.arange(len(PATTERNS))


@dataclass
class DeltaZipConfig(MethodConfig):
    #: bits per kept code
    bits: int = 2
    #: input columns sharing one grid; 0 = one grid per row (the official code)
    group_size: int = 0
    #: GPTQ damping, as a fraction of the mean diagonal of the Hessian
    damp: float = 0.01

    def validate(self) -> None:
        check_range("bits", self.bits, 1, 8)
        check_range("group_size", self.group_size, 0)
        check_range("damp", self.damp, 0.0, lo_open=True)


def _padded_cols(n: int) -> int:
    return -(-n // PRUNE_M) * PRUNE_M


@register_method
class DeltaZip(Method):
    """Fields ``codes`` and ``scales`` (:mod:`deltadct.methods._gptq_storage`): the kept codes (2 per run
    of 4, row-major), the 3-bit pattern id of every run, then the grid (zero points, scales)."""

    name = "deltazip"
    Config = DeltaZipConfig
    needs_calibration = True

    def size_knob(self) -> SizeKnob:
        # the 2:4 pattern's 3 bits per run of 4 stay: 1.25 bits/param at 1 bit per kept code, 4.75 at 8
        return SizeKnob("bits", 1, 8, lambda v: {"bits": int(v)}, integer=True)

    def compress(self, delta: torch.Tensor, *, name: str = "", hessian: torch.Tensor | None = None) -> Compressed:
        c = self.config
        matrix = as_matrix(delta.float())
        m, n = matrix.shape
        h = check_hessian(hessian, n, self.name, name).to(matrix.device)
        width = _padded_cols(n)
        if width != n:  # dead (zero-Hessian) columns: weight 0, pruned first, never stored
            matrix = torch.nn.functional.pad(matrix, (0, width - n))
            h = torch.nn.functional.pad(h, (0, width - n, 0, width - n))
        result = gptq_quantize(matrix, h, bits=c.bits, group_size=c.group_size, damp=c.damp, act_order=False,
                               prune_n=PRUNE_N, prune_m=PRUNE_M)
        keep = ~result.pruned.reshape(-1, PRUNE_M)
        pattern = _PATTERN_ID.to(keep.device)[(keep.long() << torch.arange(PRUNE_M, device=keep.device)).sum(1)]
        out = StreamWriter(name)
        out.packed(result.codes.reshape(-1, PRUNE_M)[keep], c.bits)
        out.packed(pattern, PATTERN_BITS)
        out.gptq(result, c.bits, codes=False)
        return Compressed(out.fields())

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        c = self.config
        m, n = matrix_shape(tuple(shape))
        width = _padded_cols(n)
        runs = m * width // PRUNE_M
        stream = StreamReader(compressed.tensors)
        kept_codes = stream.packed(runs * (PRUNE_M - PRUNE_N), c.bits)
        keep = PATTERNS.to(stream.device)[stream.packed(runs, PATTERN_BITS).long()].reshape(m, width)
        scale, zero = stream.grid(m, width, c.bits, c.group_size, None)
        codes = torch.zeros(m, width, dtype=torch.uint8, device=stream.device)
        codes[keep] = kept_codes
        out = torch.where(keep, dequantize_asymmetric(codes, scale, zero), torch.zeros((), device=scale.device))
        return out[:, :n].reshape(tuple(shape))
