"""GPTQ against a straightforward reference written here from the paper: quantise one column at a
time in float64, update the remaining columns with the Optimal Brain Surgeon step
δ_F = −(w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F} and remove column j from H_F⁻¹ by Gaussian
elimination (no Cholesky factor, no lazy blocks). The library's lazy-batch Cholesky version must give
the same codes and grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deltadct.errors import ConfigError
from deltadct.gptq import gptq_quantize, hessian


def reference_grid(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """min/max grid containing 0, fp16 scale, integer zero point (the official quantiser's formula)."""
    maxq = 2 ** bits - 1
    lo = np.minimum(values.min(axis=1), 0.0)
    hi = np.maximum(values.max(axis=1), 0.0)
    flat = (lo == 0) & (hi == 0)
    lo[flat], hi[flat] = -1.0, 1.0
    scale = np.maximum(((hi - lo) / maxq).astype(np.float16).astype(np.float64), 2.0 ** -24)
    return scale, np.clip(np.round(-lo / scale), 0, maxq)


def reference_gptq(w: torch.Tensor, h: torch.Tensor, *, bits: int, group: int, damp: float = 0.01,
                   act_order: bool = True, prune: tuple[int, int] | None = None):
    w, h = w.double().numpy().copy(), h.double().numpy().copy()
    rows, cols = w.shape
    for j in range(cols):
        if h[j, j] == 0:  # a dead input: its weight column cannot matter
            h[j, j] = 1.0
            w[:, j] = 0.0
    order = sorted(range(cols), key=lambda j: -h[j, j]) if act_order else list(range(cols))
    w, h = w[:, order], h[np.ix_(order, order)]
    h += damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.inv(h)
    # [H_F⁻¹]_kk at the moment column k is reached (columns < k eliminated): SparseGPT's pruning score
    # weighs the next prune[1] columns by these, fixed in advance by the column order
    pivots, eliminated = np.zeros(cols), hinv.copy()
    for k in range(cols):
        pivots[k] = eliminated[k, k]
        eliminated = eliminated - np.outer(eliminated[:, k], eliminated[k, :]) / eliminated[k, k]
    codes = np.zeros((rows, cols))
    scales, zeros = [], []
    pruned = np.zeros((rows, cols), dtype=bool)
    maxq = 2 ** bits - 1
    for j in range(cols):
        if j % group == 0:
            scale, zero = reference_grid(w[:, j:j + group], bits)
            scales.append(scale)
            zeros.append(zero)
        if prune is not None and j % prune[1] == 0:
            block = slice(j, j + prune[1])
            score = w[:, block] ** 2 / pivots[block]  # w² / [H⁻¹]_kk
            for r in range(rows):
                pruned[r, j + np.argsort(score[r], kind="stable")[:prune[0]]] = True
        target = np.where(pruned[:, j], 0.0, w[:, j])
        q = np.clip(np.round(target / scale) + zero, 0, maxq)
        codes[:, j] = q
        err = (w[:, j] - scale * (q - zero)) / hinv[j, j]
        w[:, j:] -= np.outer(err, hinv[j, j:])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    inverse = np.argsort(order)
    group_index = np.empty(cols, dtype=np.int64)
    group_index[order] = np.arange(cols) // group
    return codes[:, inverse], np.stack(scales, 1), np.stack(zeros, 1), group_index, pruned[:, inverse]


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs with unequal variances and correlated features, like a layer's activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim ** 0.5
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mix
    return x * torch.linspace(0.2, 3.0, dim, dtype=torch.float64)


def weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_matches_the_column_by_column_obs_reference(bits, act_order):
    x = correlated_inputs(200, 48, seed=bits)
    x[:, 5] = 0  # a dead input
    h = hessian(x.T @ x, len(x)).double()
    w = weight(7, 48, seed=10 + bits)
    got = gptq_quantize(w, h, bits=bits, group_size=16, block_size=8, act_order=act_order)
    codes, scale, zero, group_index, _ = reference_gptq(w, h, bits=bits, group=16, act_order=act_order)
    np.testing.assert_array_equal(got.group_index.numpy(), group_index)
    np.testing.assert_array_equal(got.scale.numpy(), scale)
    np.testing.assert_array_equal(got.zero.numpy(), zero)
    np.testing.assert_array_equal(got.codes.numpy(), codes)
    assert (got.dequantize()[:, 5] == 0).all()  # the dead column quantises to an exact 0


def test_gptq_with_two_to_four_pruning_matches_the_reference():
    x = correlated_inputs(150, 32, seed=3)
    h = hessian(x.T @ x, len(x)).double()
    w = weight(5, 32, seed=4)
    got = gptq_quantize(w, h, bits=2, group_size=0, act_order=False, prune_n=2, prune_m=4)
    codes, scale, zero, _, pruned = reference_gptq(w, h, bits=2, group=32, act_order=False, prune=(2, 4))
    np.testing.assert_array_equal(got.pruned.numpy(), pruned)
    np.testing.assert_array_equal(got.codes.numpy(), codes)
    np.testing.assert_array_equal(got.scale.numpy(), scale)
    assert (got.pruned.reshape(5, 8, 4).sum(-1) == 2).all()  # exactly 2 of every 4 per row
    assert (got.dequantize()[got.pruned] == 0).all()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_identity_hessian_is_round_to_nearest(act_order):
    w = weight(9, 70, seed=5).float()
    got = gptq_quantize(w, torch.eye(70), bits=3, group_size=32, act_order=act_order)
    # round-to-nearest per group of 32 consecutive columns (the last one has 6), grid as above
    for g, start in enumerate(range(0, 70, 32)):
        block = w[:, start:start + 32].double().numpy()
        scale, zero = reference_grid(block, 3)
        expected = np.clip(np.round(block / scale[:, None]) + zero[:, None], 0, 7)
        np.testing.assert_array_equal(got.codes[:, start:start + 32].numpy(), expected)
        np.testing.assert_allclose(got.scale[:, g].numpy(), scale, rtol=1e-7)


def test_gptq_lowers_the_output_error_below_round_to_nearest():
    x = correlated_inputs(400, 64, seed=7).float()
    h = hessian(x.T @ x, len(x))
    w = weight(32, 64, seed=8).float()
    gptq = gptq_quantize(w, h, bits=2, group_size=32).dequantize()
    rtn = gptq_quantize(w, torch.eye(64), bits=2, group_size=32).dequantize()
    out_err = lambda approx: float(torch.linalg.vector_norm((approx - w) @ x.T))  # noqa: E731
    assert out_err(gptq) < 0.8 * out_err(rtn)


def test_gptq_refuses_a_hessian_of_the_wrong_size():
    with pytest.raises(ConfigError, match="Hessian has shape"):
        gptq_quantize(torch.zeros(4, 8), torch.eye(6), bits=2)


def test_rows_of_several_widths_in_one_pass_equal_separate_passes():
    x = correlated_inputs(120, 40, seed=9)
    h = hessian(x.T @ x, len(x)).double()
    w = weight(6, 40, seed=11)
    widths = torch.tensor([8, 8, 3, 3, 2, 2])
    together = gptq_quantize(w, h, bits=widths, group_size=16)
    for start, bits in ((0, 8), (2, 3), (4, 2)):
        alone = gptq_quantize(w[start:start + 2], h, bits=bits, group_size=16)
        part = together.rows(start, start + 2)
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.scale, alone.scale)
        assert torch.equal(part.zero, alone.zero)
