"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantise a weight matrix column by column, pushing each column's
rounding error onto the columns not yet quantised so that ``‖(Ŵ − W) X‖`` stays small on
calibration inputs X.

Small tensor functions, batched over all rows at once (only the columns are visited in order, which
is the algorithm):

- :func:`hessian` turns accumulated input moments (Σ xxᵀ and a count, see
  :mod:`deltadct.calibration`) into the layer Hessian H = 2·XᵀX / n.
- :func:`asymmetric_grid`, :func:`quantize_asymmetric`, :func:`dequantize_asymmetric`: the
  GPTQ-family min/max quantiser with a zero point on its grid (the range is widened to contain 0,
  ``zero = round(−min / scale)`` is an integer code, so 0 is represented exactly).
- :func:`gptq_quantize` runs the algorithm as the official IST-DASLab/gptq code defines it: dead
  inputs (diag H = 0) get H_jj = 1 and a zero weight column; damping λ = ``damp``·mean(diag H) on the
  diagonal; optional act-order (columns by descending diag H, groups formed in that order, the
  permutation undone on output); the upper Cholesky factor of H⁻¹ drives the updates, applied
  lazily per block of columns. Groups of ``group_size`` columns get their own grid, computed
  when their first column is reached, from the already-updated weights. With ``prune_n:prune_m``
  it is the SparseGPT variant (Frantar & Alistarh, 2023): in every run of ``prune_m`` columns the
  ``prune_n`` weights of each row with the least w²/[H⁻¹]²_jj are set to zero before quantising.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

#: smallest positive fp16 number: scales are stored as fp16 and must not underflow to 0
_FP16_TINY = 2.0 ** -24


def hessian(xtx: torch.Tensor, count: int) -> torch.Tensor:
    """H = 2·XᵀX / n from the sum of input outer products ``xtx`` over ``count`` input vectors."""
    if count <= 0:
        raise ConfigError("a Hessian needs at least one calibration input vector (count is 0)")
    return xtx.float() * (2.0 / count)


def _maxq(bits: int | torch.Tensor, like: torch.Tensor) -> int | torch.Tensor:
    """2**bits − 1: one number, or per row (R,) when ``bits`` is a tensor of widths."""
    if isinstance(bits, torch.Tensor):
        return ((1 << bits.to(torch.int64)) - 1).to(like.device, like.dtype)
    return (1 << bits) - 1


def asymmetric_grid(values: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``values`` (R, k): the scale (fp16-representable) and integer zero point of the
    ``bits``-bit min/max grid that contains 0 (``bits`` one width, or one per row).

    An all-zero row gets the range (−1, 1), as in the official quantiser, so its scale is never 0.
    """
    maxq = _maxq(bits, values)
    lo = values.amin(dim=1).clamp(max=0)
    hi = values.amax(dim=1).clamp(min=0)
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).to(torch.float16).to(values.dtype).clamp(min=_FP16_TINY)
    zero = torch.minimum(torch.round(-lo / scale).clamp(min=0), torch.as_tensor(maxq, dtype=values.dtype))
    return scale, zero


def quantize_asymmetric(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bits: int | torch.Tensor) -> torch.Tensor:
    """Codes ``clamp(round(x / scale) + zero, 0, 2**bits − 1)``; ``scale``, ``zero`` and per-row ``bits``
    broadcast against ``values``."""
    codes = (torch.round(values / scale) + zero).clamp(min=0)
    return torch.minimum(codes, torch.as_tensor(_maxq(bits, values), dtype=values.dtype))


def dequantize_asymmetric(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale · (code − zero)``."""
    return scale * (codes.to(scale.dtype) - zero)


@dataclass
class GPTQResult:
    """One quantised matrix, in its original column order.

    ``codes`` (R, C) uint8; ``scale`` (R, G) and ``zero`` (R, G) per row and column group;
    ``group_index`` (C,) the group of each column (``arange(C) // group_size`` without act-order);
    ``pruned`` (R, C) bool, the entries set to zero by N:M pruning (None without pruning).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_index: torch.Tensor
    pruned: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        index = self.group_index
        return dequantize_asymmetric(self.codes, self.scale[:, index], self.zero[:, index])

    def rows(self, start: int, stop: int) -> "GPTQResult":
        """The result for rows ``start:stop`` (rows are quantised independently of each other)."""
        pick = slice(start, stop)
        return GPTQResult(self.codes[pick], self.scale[pick], self.zero[pick], self.group_index,
                          None if self.pruned is None else self.pruned[pick])


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (what the official code calls Hinv)."""
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError:
        raise ConfigError("the calibration Hessian is not positive definite even after damping: "
                          "use more calibration samples or a larger damping") from None


def gptq_quantize(weight: torch.Tensor, hess: torch.Tensor, *, bits: int | torch.Tensor, group_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                  prune_n: int = 0, prune_m: int = 0) -> GPTQResult:
    """GPTQ of ``weight`` (R, C) against the Hessian ``hess`` (C, C) of its inputs.

    ``bits``: one width, or a (R,) tensor of widths per row (each row's updates involve only that
    row, so rows of several widths quantise in one pass exactly as they would apart).
    ``group_size`` 0 means one grid per row, computed before the first column (as the official code
    does without groups). Computes in float64 when ``weight`` is float64, else in float32.
    """
    if weight.ndim != 2:
        raise ConfigError(f"GPTQ needs a matrix, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hess.shape) != (cols, cols):
        raise ConfigError(f"the Hessian has shape {list(hess.shape)} but a {rows}×{cols} weight needs "
                          f"{cols}×{cols} (one row and column per input feature)")
    widths = bits.tolist() if isinstance(bits, torch.Tensor) else [bits]
    if not all(1 <= b <= 8 for b in widths) or (isinstance(bits, torch.Tensor) and bits.shape != (rows,)):
        raise ConfigError(f"GPTQ bits must be in 1..8, one width or one per row, got {bits}")
    if prune_n and (prune_m <= prune_n or cols % prune_m):
        raise ConfigError(f"{prune_n}:{prune_m} pruning needs prune_m > prune_n and a column count that is a "
                          f"multiple of {prune_m} (got {cols})")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype).clone()
    if isinstance(bits, torch.Tensor):
        bits = bits.to(w.device)
    h = hess.to(w.device, dtype).clone()

    dead = torch.diagonal(h) == 0
    torch.diagonal(h).masked_fill_(dead, 1.0)
    w[:, dead] = 0
    perm = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
            else torch.arange(cols, device=w.device))
    w, h = w[:, perm], h[perm][:, perm]
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    hinv = _inverse_cholesky(h)

    group = group_size if group_size > 0 else cols
    num_groups = math.ceil(cols / group)
    # a block starts at every group start, so each grid sees weights with every earlier update applied
    block = block_size if group % block_size == 0 or num_groups == 1 else group
    scale = w.new_zeros(rows, num_groups)
    zero = w.new_zeros(rows, num_groups)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device) if prune_n else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                # col is a block start, so w holds every update made so far to the group's columns
                g = col // group
                scale[:, g], zero[:, g] = asymmetric_grid(w[:, col:col + group], bits)
            if prune_n and i % prune_m == 0:
                score = w1[:, i:i + prune_m].square() / torch.diagonal(hinv1)[i:i + prune_m].square()
                drop = torch.topk(score, prune_n, dim=1, largest=False).indices
                pruned[:, i1:i2].scatter_(1, i + drop, True)
            column = w1[:, i]
            target = column.masked_fill(pruned[:, col], 0.0) if prune_n else column
            s, z = scale[:, col // group], zero[:, col // group]
            q = quantize_asymmetric(target, s, z, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (column - dequantize_asymmetric(q, s, z)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    group_index = torch.empty(cols, dtype=torch.long, device=w.device)
    group_index[perm] = torch.arange(cols, device=w.device) // group
    return GPTQResult(codes[:, inverse], scale, zero, group_index,
                      None if pruned is None else pruned[:, inverse])
