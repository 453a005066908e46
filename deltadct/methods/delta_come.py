"""Delta-CoMe as published (Ping et al., NeurIPS 2024; official code thunlp/Delta-CoMe): the delta's
singular vectors quantised with GPTQ at mixed precision, on calibration activations.

For an m×n delta (output × input features; conv kernels as (out, in·k·k)) with SVD Δ = U S Vᵀ:

1. Singular directions, largest first, go into groups of decreasing precision (``bit_widths``,
   default 8 / 3 / 2 bits). Every group but the last holds a fixed number of directions
   (``counts``, default 2 and 32: the published 2 / 32 / rest vectors at 8 / 3 / 2 bits, which put a
   4096×4096 matrix at 1 bit/param with 968 directions at 2 bits); the last group takes as many further
   directions as the budget allows; the remaining directions are dropped.
2. Budget: the payload of every field below may not exceed ``bits``·m·n bits. Groups are filled in
   order, each as far as it fits, so a tight budget shrinks the later groups first.
3. S is kept unquantised, as fp16. For each group, as in the official code's order and Hessians:
   Vᵀ_g (k×n, the map x ↦ Vᵀx) is quantised first, per direction in groups of ``group_size`` input
   features, with GPTQ on H = 2·XᵀX/n of the layer inputs; then U_g (m×k) per output row in groups
   of ``group_size`` directions, with GPTQ on the Hessian of the projected inputs z = S_g V̂ᵀ_g x,
   which is P H Pᵀ with P = S_g V̂ᵀ_g (no second pass over the data). GPTQ runs with act-order,
   damping 0.01·mean(diag H) and the asymmetric min/max grid with a zero point (:mod:`deltadct.gptq`).
4. Reconstruction: Δ̂ = Σ_g Û_g diag(S_g) V̂ᵀ_g.

Small matrices: the published counts are *not* scaled with the matrix width; the first groups keep
2 and 32 directions (fewer only when the budget or the rank runs out) and the last group shrinks
instead. Scaling the counts by width (1 / 3 / 83 directions for 384-wide MiniLM matrices instead of
2 / 32 / 40) raised the MiniLM delta error from 0.415 to 0.461 with the same quantiser: the top
directions carry most of a fine-tuning delta's energy whatever its width, so they are what the high
precision is for.

Departures from the official code: the budget counts S, scales, zero points and act-order group
indices, not only the codes, so at 1 bit/param the last group is a little smaller than the
published 968; Hessians come from one pass over the calibration data through the fine-tuned model
(see :mod:`deltadct.calibration`), where the official code runs the model layer by layer with each
layer's inputs taken from the already compressed layers before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..gptq import gptq_quantize
from . import register_method
from ._gptq_storage import (StreamReader, StreamWriter, check_hessian, gptq_bytes, group_index_bytes,
                            stores_group_index)
from .base import Compressed, Method, MethodConfig, SizeKnob, as_matrix, check_range, matrix_shape


@dataclass
class DeltaCoMeConfig(MethodConfig):
    # version 2: ``delta_come`` became the published, calibrated algorithm; files of version 1 hold the
    # data-free variant, now ``delta_come_rtn``, and are decoded by it (:meth:`DeltaCoMe.decoder_for`)
    VERSION = 2

    #: payload budget in bits per parameter, side information included
    bits: float = 1.0
    #: width of each group of singular directions, highest precision (largest singular values) first
    bit_widths: tuple[int, ...] = (8, 3, 2)
    #: directions in every group but the last (the published counts); the last group fills the budget
    counts: tuple[int, ...] = (2, 32)
    #: input features (for V) / directions (for U) sharing one scale and zero point
    group_size: int = 128
    #: GPTQ damping, as a fraction of the mean diagonal of the Hessian
    damp: float = 0.01
    #: GPTQ act-order: quantise columns by descending Hessian diagonal
    act_order: bool = True

    def validate(self) -> None:
        check_range("bits", self.bits, 0.0, 32.0, lo_open=True)
        if not self.bit_widths or any(not 1 <= b <= 8 for b in self.bit_widths):
            raise ConfigError(f"option 'bit_widths': {list(self.bit_widths)} must be one or more widths in 1..8")
        if len(self.counts) != len(self.bit_widths) - 1:
            raise ConfigError(f"option 'counts': {list(self.counts)} needs one count per group but the last "
                              f"({len(self.bit_widths) - 1} for bit_widths {list(self.bit_widths)})")
        if any(c < 0 for c in self.counts):
            raise ConfigError(f"option 'counts': {list(self.counts)} must be non-negative")
        check_range("group_size", self.group_size, 1)
        check_range("damp", self.damp, 0.0, lo_open=True)


def payload_bytes(m: int, n: int, ranks: list[int], cfg: DeltaCoMeConfig) -> int:
    """Bytes of every field an m×n delta writes with ``ranks`` directions per group."""
    g, order = cfg.group_size, cfg.act_order
    kept = sum(ranks)
    total = 2 * kept  # S, fp16
    if kept and stores_group_index(n, g, order):  # one act-order order for all V groups (same Hessian)
        total += group_index_bytes(n, g)
    for width, k in zip(cfg.bit_widths, ranks, strict=True):
        if k:
            total += gptq_bytes(k, n, width, g) + gptq_bytes(m, k, width, g)
            if stores_group_index(k, g, order):
                total += group_index_bytes(k, g)
    return total


def group_ranks(m: int, n: int, cfg: DeltaCoMeConfig) -> list[int]:
    """Directions in each precision group of an m×n delta (see the module's recipe)."""
    budget = cfg.bits * m * n / 8
    left = min(m, n)
    ranks = [0] * len(cfg.bit_widths)
    for i in range(len(ranks)):
        lo, hi = 0, min(cfg.counts[i] if i < len(cfg.counts) else left, left)
        while lo < hi:  # the largest k that fits: the payload grows with k
            mid = (lo + hi + 1) // 2
            ranks[i] = mid
            lo, hi = (mid, hi) if payload_bytes(m, n, ranks, cfg) <= budget else (lo, mid - 1)
        ranks[i] = lo
        left -= lo
    if sum(ranks) == 0:  # budget below one direction: keep the top one anyway, like lowrank's rank ≥ 1
        ranks[0] = 1
    return ranks


@register_method
class DeltaCoMe(Method):
    """Fields ``scales`` and ``codes`` (:mod:`deltadct.methods._gptq_storage`), in this order: the fp16
    singular values of the kept directions; the act-order groups of the input features (shared by
    every Vᵀ, which all see the same Hessian); then per precision group Vᵀ_g (k×n) and U_g (m×k),
    each preceded by its own act-order groups where it has several."""

    name = "delta_come"
    Config = DeltaCoMeConfig
    needs_calibration = True

    @classmethod
    def decoder_for(cls, version: int) -> type[Method]:
        if version < 2:
            from .delta_come_rtn import DeltaCoMeRTN

            return DeltaCoMeRTN
        return cls

    def size_knob(self) -> SizeKnob:
        # the size stops growing once every direction is kept (at the last group's width)
        return SizeKnob("bits", 0.01, 32.0, lambda v: {"bits": v})

    def compress(self, delta: torch.Tensor, *, name: str = "", hessian: torch.Tensor | None = None) -> Compressed:
        c = self.config
        matrix = as_matrix(delta.float())
        m, n = matrix.shape
        h = check_hessian(hessian, n, self.name, name).to(matrix.device)
        ranks = group_ranks(m, n, c)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        out = StreamWriter(name)
        out.fp16(s[:sum(ranks)], "a singular value")
        s_hat = s[:sum(ranks)].to(torch.float16).float()  # what the reader sees
        options = dict(group_size=c.group_size, damp=c.damp, act_order=c.act_order)
        # every kept direction of Vᵀ in one GPTQ pass, each row at its group's width: the rows share the
        # Hessian and never touch each other, so this is the per-group quantisation done at once
        widths = torch.tensor([w for w, k in zip(c.bit_widths, ranks, strict=True) for _ in range(k)],
                              device=matrix.device)
        v_all = gptq_quantize(vh[:sum(ranks)], h, bits=widths, **options)
        if stores_group_index(n, c.group_size, c.act_order):
            out.group_index(v_all)
        start = 0
        for width, k in zip(c.bit_widths, ranks, strict=True):
            if not k:
                continue
            directions = slice(start, start + k)
            v_result = v_all.rows(start, start + k)
            out.gptq(v_result, width)
            projection = s_hat[directions].unsqueeze(1) * v_result.dequantize()  # z = S_g V̂ᵀ_g x
            u_result = gptq_quantize(u[:, directions], projection @ h @ projection.T, bits=width, **options)
            if stores_group_index(k, c.group_size, c.act_order):
                out.group_index(u_result)
            out.gptq(u_result, width)
            start += k
        return Compressed(out.fields())

    def reconstruct(self, compressed: Compressed, shape) -> torch.Tensor:
        c = self.config
        m, n = matrix_shape(tuple(shape))
        ranks = group_ranks(m, n, c)
        stream = StreamReader(compressed.tensors)
        s = stream.fp16(sum(ranks))
        v_groups = (stream.group_index(n, c.group_size) if stores_group_index(n, c.group_size, c.act_order)
                    else None)
        out = torch.zeros(m, n, dtype=torch.float32, device=stream.device)
        start = 0
        for width, k in zip(c.bit_widths, ranks, strict=True):
            if not k:
                continue
            vt = stream.gptq(k, n, width, c.group_size, v_groups)
            u_groups = (stream.group_index(k, c.group_size) if stores_group_index(k, c.group_size, c.act_order)
                        else None)
            u = stream.gptq(m, k, width, c.group_size, u_groups)
            out += (u * s[start:start + k]) @ vt
            start += k
        return out.reshape(tuple(shape))
