"""DCT against scipy, and patch split / scoring / allocation against numpy and hand counts."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from deltadct import patches as P
from deltadct.transforms import dct2, dct_matrix, idct2


@pytest.mark.parametrize("p", [8, 16, 32, 64])
def test_dct2_matches_scipy_dctn(p):
    x = np.random.default_rng(p).standard_normal((5, 3, p, p)).astype(np.float32)
    expected = scipy.fft.dctn(x.astype(np.float64), type=2, norm="ortho", axes=(-2, -1))
    got = dct2(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_dct2_non_square_matches_scipy():
    x = np.random.default_rng(1).standard_normal((4, 8, 24)).astype(np.float32)
    expected = scipy.fft.dctn(x.astype(np.float64), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(dct2(torch.from_numpy(x)).numpy(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("p", [8, 16, 32, 64])
def test_idct2_inverts_dct2(p):
    x = torch.randn(7, p, p, generator=torch.Generator().manual_seed(p))
    torch.testing.assert_close(idct2(dct2(x)), x, atol=1e-5, rtol=0)
    expected = scipy.fft.idctn(x.double().numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(idct2(x).numpy(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 8, 16, 33, 64])
def test_dct_matrix_is_orthonormal(n):
    c = dct_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # rows are scipy's DCT-II of the unit vectors
    np.testing.assert_allclose(c.numpy(), scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0), atol=1e-12)


@pytest.mark.parametrize("shape,p", [((64, 48), 16), ((50, 37), 16), ((7, 5), 8), ((16, 16), 16), ((3, 100), 32)])
def test_patchify_unpatchify_round_trip(shape, p):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    blocks = P.patchify(x, p)
    gr, gc = -(-shape[0] // p), -(-shape[1] // p)
    assert blocks.shape == (gr * gc, p, p)
    torch.testing.assert_close(P.unpatchify(blocks, shape), x, atol=0, rtol=0)
    # row-major patch order, zero padding at the bottom/right edge
    padded = np.zeros((gr * p, gc * p), dtype=np.float32)
    padded[: shape[0], : shape[1]] = x.numpy()
    for idx in (0, gc - 1, gr * gc - 1):
        r, c = divmod(idx, gc)
        np.testing.assert_array_equal(blocks[idx].numpy(), padded[r * p:(r + 1) * p, c * p:(c + 1) * p])


def test_importance_matches_numpy_norms():
    blocks = torch.randn(11, 8, 8, generator=torch.Generator().manual_seed(3))
    flat = blocks.reshape(11, -1).double().numpy()
    np.testing.assert_allclose(P.importance(blocks, "l2").numpy(), np.linalg.norm(flat, axis=1), rtol=1e-6)
    np.testing.assert_allclose(P.importance(blocks, "l1").numpy(), np.abs(flat).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(P.importance(blocks, "max").numpy(), np.abs(flat).max(axis=1), rtol=0)
    with pytest.raises(ValueError, match="unknown importance"):
        P.importance(blocks, "l3")


@pytest.mark.parametrize("n,ratios,expected", [
    (10, (0.25, 0.5, 0.25), [2, 5, 3]),      # cumulative 2.5 → 2, 7.5 → 7
    (7, (0.2, 0.6, 0.2), [1, 4, 2]),         # cumulative 1.4 → 1, 5.6 → 5
    (2304, (0.2, 0.6, 0.2), [460, 1383, 461]),  # 768×768 at p=16: 460.8 → 460, 1843.2 → 1843
    (100, (0.29, 0.71), [29, 71]),           # 0.29·100 is 28.999… in floats
    (10, (0.0, 1.0, 0.0), [0, 10, 0]),
    (0, (0.2, 0.6, 0.2), [0, 0, 0]),
])
def test_allocation_counts_hand_computed(n, ratios, expected):
    assert P.allocation_counts(n, ratios) == expected


@pytest.mark.parametrize("n", range(1, 60))
def test_allocation_counts_sum_and_never_exceed_budget(n):
    ratios, widths = (0.2, 0.6, 0.2), (2, 1, 0)
    counts = P.allocation_counts(n, ratios)
    assert sum(counts) == n
    assert all(abs(c - r * n) < 1 + 1e-9 for c, r in zip(counts, ratios, strict=True))
    assert sum(c * b for c, b in zip(counts, widths, strict=True)) <= n * 1.0 + 1e-9


def test_allocate_gives_top_scores_the_high_widths_and_ties_stable():
    scores = torch.tensor([0.5, 3.0, 1.0, 1.0, 1.0, 0.1, 2.0, 1.0])
    bits = P.allocate(scores, [2, 4, 2], (2, 1, 0))
    # top two (3.0, 2.0) → 2 bits; the four 1.0s keep patch order → 1 bit; 0.5 and 0.1 → 0
    assert bits.tolist() == [0, 2, 1, 1, 1, 0, 2, 1]
    tied = P.allocate(torch.ones(6), [1, 3, 2], (2, 1, 0))
    assert tied.tolist() == [2, 1, 1, 1, 0, 0]  # equal scores: earlier patches first
    counts = torch.bincount(P.allocate(torch.rand(1000), [200, 600, 200], (2, 1, 0)).long(), minlength=3)
    assert counts.tolist() == [200, 600, 200]
