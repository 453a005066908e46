"""Each method against a reference written here from its published equations (numpy, not the method).

Fixed, seeded tensors; exact equality for the deterministic quantisers, statistics for the random
drops (DARE's keep rate within a binomial bound and E[Δ̂] = Δ; UltraDelta's per-level counts).
Not covered here: ``delta_come`` / ``deltadct_auto`` (their recipes are this project's data-free
variants, tested in test_baselines.py / test_deltadct_auto.py), and Delta-DCT's default log-coded
ranges (the paper's fp16 ranges are the reference; test_codec.py covers the log coding).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deltadct.methods import create_method
from deltadct.policy import TensorPolicy

REPO = Path(__file__).resolve().parent.parent


def heavy_tailed(shape, seed=0, scale=1e-3) -> np.ndarray:
    """Student-t (3 degrees of freedom) entries: the heavy tails fine-tuning deltas have."""
    return (np.random.default_rng(seed).standard_t(3, size=shape) * scale).astype(np.float32)


def run(name: str, delta: np.ndarray, key: str = "w", **options) -> np.ndarray:
    method = create_method(name, **options)
    tensor = torch.from_numpy(delta)
    if method.needs_plan:
        method.plan([(key, tensor)])
    return method.reconstruct(method.compress(tensor, name=key), tensor.shape).numpy()


# ------------------------------------------------------------------ BitDelta (Liu et al., 2024)

def test_bitdelta_official_semantics():
    d = heavy_tailed((40, 70))
    d[0, :5] = 0.0
    # sign with Δ = 0 → +1, one scale per matrix: mean |Δ| (in fp32, as the official code keeps it)
    expected = np.where(d >= 0, 1.0, -1.0) * np.float32(np.abs(d.astype(np.float64)).mean())
    assert np.array_equal(run("bitdelta", d), expected.astype(np.float32))


def test_bitdelta_official_policy_compresses_projections_only():
    from hydra import compose, initialize_config_dir

    from experiments.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        cfg = compose("config", overrides=["model=llama2_7b_chat", "method=bitdelta", "policy=bitdelta_official"])
    policy = validate(cfg).policy
    assert isinstance(policy, TensorPolicy)
    compressed = [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkvo"] + \
                 [f"model.layers.3.mlp.{p}_proj.weight" for p in ("gate", "up", "down")] + \
                 ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "transformer.h.0.attn.c_attn.weight",
                  "roberta.encoder.layer.0.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight"]
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.3.input_layernorm.weight",
            "classifier.dense.weight", "roberta.embeddings.word_embeddings.weight", "head.weight",
            "encoder.layer.0.attention.output.LayerNorm.weight", "pooler.dense.weight"]
    assert all(policy.selects(name, 2) for name in compressed)
    assert not any(policy.selects(name, 2) for name in kept)


# ------------------------------------------------------------------ per-axis 1-bit

def test_bitdelta_axis_picks_the_axis_with_less_error():
    for d in (heavy_tailed((48, 64), seed=1) * np.logspace(-1, 1, 48)[:, None].astype(np.float32),  # rows differ
              heavy_tailed((48, 64), seed=2) * np.logspace(-1, 1, 64)[None, :].astype(np.float32)):  # columns differ
        signs = np.where(d >= 0, 1.0, -1.0).astype(np.float32)
        rows = np.abs(d.astype(np.float64)).mean(axis=1).astype(np.float32).astype(np.float16).astype(np.float32)
        cols = np.abs(d.astype(np.float64)).mean(axis=0).astype(np.float32).astype(np.float16).astype(np.float32)
        by_row, by_col = signs * rows[:, None], signs * cols[None, :]
        err_row, err_col = ((by_row - d).astype(np.float64) ** 2).sum(), ((by_col - d).astype(np.float64) ** 2).sum()
        expected = by_row if err_row <= err_col else by_col
        assert np.array_equal(run("bitdelta_axis", d), expected)
    # the two cases above pick different axes: the row-scaled one rows, the column-scaled one columns
    method = create_method("bitdelta_axis")
    axes = [method.compress(torch.from_numpy(d)).meta["axis"] for d in
            (np.outer(np.logspace(-2, 0, 30), np.ones(40)).astype(np.float32),
             np.outer(np.ones(30), np.logspace(-2, 0, 40)).astype(np.float32))]
    assert axes == ["row", "col"]


# ------------------------------------------------------------------ ComPEFT (Yadav et al., 2023)

@pytest.mark.parametrize("density, alpha", [(0.2, 1.0), (0.01, 2.5), (1.0, 0.5)])
def test_compeft_top_k_signs_times_alpha_std(density, alpha):
    d = heavy_tailed((64, 90), seed=3)
    flat = d.reshape(-1)
    k = max(1, math.floor(density * flat.size))
    top = np.argsort(-np.abs(flat), kind="stable")[:k]
    scale = np.float32(alpha * flat.astype(np.float64).std(ddof=1))  # torch.std: Bessel-corrected
    expected = np.zeros_like(flat)
    expected[top] = np.where(flat[top] >= 0, 1.0, -1.0) * scale
    assert np.array_equal(run("compeft", d, density=density, alpha=alpha).reshape(-1), expected)


# ------------------------------------------------------------------ DARE (Yu et al., 2024)

def test_dare_keep_rate_and_unbiasedness():
    d = heavy_tailed((200, 250), seed=4)
    p = 0.9
    outs = np.stack([run("dare", d, p=p, seed=s) for s in range(64)])
    kept = outs != 0
    n = d.size
    for out, mask in zip(outs, kept, strict=True):
        # the survivors are Δ / (1 − p) (stored as fp16), the rest 0
        assert np.array_equal(out[mask], (d[mask] / np.float32(1 - p)).astype(np.float16).astype(np.float32))
        # keep count ~ Binomial(n, 1 − p): within 5 standard deviations
        assert abs(mask.sum() - (1 - p) * n) <= 5 * math.sqrt(n * p * (1 - p))
    # E[Δ̂] = Δ: the mean over S seeds has relative error ≈ √(p / ((1 − p)·S)) (0.375 here), not more
    mean = outs.astype(np.float64).mean(axis=0)
    rel = np.linalg.norm(mean - d) / np.linalg.norm(d)
    assert rel <= 1.2 * math.sqrt(p / ((1 - p) * len(outs)))
    # and the masks differ between seeds (independent draws), agreeing on ~(1 − p)² of the entries
    both = (kept[0] & kept[1]).mean()
    assert abs(both - (1 - p) ** 2) <= 5 * math.sqrt((1 - p) ** 2 / n)


# ------------------------------------------------------------------ magnitude, low-rank, references

@pytest.mark.parametrize("density", [0.05, 0.3])
def test_magnitude_top_k_in_fp16(density):
    d = heavy_tailed((64, 80), seed=5)
    flat = d.reshape(-1)
    k = round(density * flat.size)
    top = np.argsort(-np.abs(flat), kind="stable")[:k]
    expected = np.zeros_like(flat)
    expected[top] = flat[top].astype(np.float16).astype(np.float32)
    assert np.array_equal(run("magnitude", d, density=density).reshape(-1), expected)


def test_lowrank_is_the_truncated_svd():
    d = heavy_tailed((96, 160), seed=6)
    r = int(1.0 * 96 * 160 // (16 * (96 + 160)))  # rank from the budget: ⌊bits·m·n / (16(m+n))⌋
    u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    us = (u[:, :r] * s[:r]).astype(np.float16).astype(np.float64)
    v = vt[:r].T.astype(np.float16).astype(np.float64)
    expected = us @ v.T
    # the SVDs agree to float precision; the fp16 factors then agree up to an fp16 rounding flip
    np.testing.assert_allclose(run("lowrank", d), expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    assert np.linalg.norm(run("lowrank", d) - expected) <= 2e-3 * np.linalg.norm(expected)


def test_none_and_zero():
    d = heavy_tailed((20, 30), seed=7)
    assert np.array_equal(run("none", d), d)
    assert np.array_equal(run("zero", d), np.zeros_like(d))


# ------------------------------------------------------------------ RTN: the GPTQ family's asymmetric grid

def rtn_reference(d: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """GPTQ's asymmetric quantiser per group of a row, with the file's scale storage (fp16 fractions of
    the matrix's largest scale), in float32 like the stored values."""
    m, n = d.shape
    top = 2 ** bits - 1
    out = np.empty_like(d)
    groups = [(i, slice(j, min(j + group_size, n))) for i in range(m) for j in range(0, n, group_size)]
    lo = np.array([min(d[i, s].min(), 0) for i, s in groups], dtype=np.float32)
    hi = np.array([max(d[i, s].max(), 0) for i, s in groups], dtype=np.float32)
    scale = np.where(hi > lo, (hi - lo) / np.float32(top), np.float32(1)).astype(np.float32)
    biggest = scale.max()
    scale = ((scale / biggest).astype(np.float16).astype(np.float32) * biggest).astype(np.float32)
    for (i, s), lo_g, step in zip(groups, lo, scale, strict=True):
        zero = np.clip(np.round(-lo_g / step), 0, top)
        q = np.clip(np.round(d[i, s] / step) + zero, 0, top)
        out[i, s] = step * (q - zero)
    return out


@pytest.mark.parametrize("bits, group_size, shape", [(2, 128, (16, 300)), (3, 32, (9, 64)), (4, 7, (5, 20)),
                                                     (1, 64, (6, 128))])
def test_rtn_equals_the_asymmetric_reference(bits, group_size, shape):
    d = heavy_tailed(shape, seed=8)
    d[:, 3] = 0.0
    out = run("rtn", d, bits=bits, group_size=group_size)
    assert np.array_equal(out, rtn_reference(d, bits, group_size))
    assert (out[:, 3] == 0).all()  # 0 is on every group's grid


def test_rtn_zero_point_beats_the_min_max_grid_on_heavy_tails():
    d = heavy_tailed((1024, 512), seed=9)
    out = run("rtn", d, bits=2, group_size=128)
    g = d.reshape(1024, 4, 128)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    min_max = (lo + np.round((g - lo) / (hi - lo) * 3) * (hi - lo) / 3).reshape(d.shape)
    rel = lambda x: np.linalg.norm(x - d) / np.linalg.norm(d)  # noqa: E731
    assert rel(out) < 0.9 * rel(min_max)
    # grid=minmax is that min-to-max grid (its fp16-rounded ends, outward), as files of config version 1 hold
    minmax = run("rtn", d, bits=2, group_size=128, grid="minmax")
    assert rel(minmax) == pytest.approx(rel(min_max), rel=1e-3)
    assert rel(out) < 0.9 * rel(minmax)


# ------------------------------------------------------------------ UltraDelta (Wang et al., 2025)

def test_ultradelta_tiers_follow_the_official_formula():
    from deltadct.methods.ultradelta import tier_rates

    # six layers of equal size sorted by std: two per third; the top third balances the mean back
    stds, sizes = [0.6, 0.1, 0.5, 0.2, 0.4, 0.3], [10] * 6
    rates = tier_rates(stds, sizes, 0.9, 0.05)
    expected_top = (0.9 * 60 - 0.9 * 20 - 0.95 * 20) / 20
    assert rates == pytest.approx([expected_top, 0.95, expected_top, 0.95, 0.9, 0.9])
    assert sum(r * s for r, s in zip(rates, sizes, strict=True)) / 60 == pytest.approx(0.9)
    # the official clamp to [0, 0.99]: a top third that would have to drop less than nothing drops nothing
    assert tier_rates([1, 2, 3], [10, 10, 10], 0.005, 0.5) == pytest.approx([0.505, 0.005, 0.0])


def test_ultradelta_quantises_then_drops_within_each_level_and_rescales():
    d = heavy_tailed((80, 120), seed=10)
    bits, mask_rate = 4, 0.9
    top = 2 ** bits - 1
    lo, hi = d.min(), d.max()
    codes = np.round((d - lo) / (hi - lo) * top)
    levels = (codes / top * (hi - lo) + lo).astype(np.float32)  # the official quantize_delta
    outs = [run("ultradelta", d, mask_rate=mask_rate, bits=bits, seed=s) for s in range(3)]
    rescale = np.float32(1.0 / (1 - mask_rate))
    for out in outs:
        kept = out != 0
        # kept entries are their quantised values times 1 / (1 − mask_rate)
        np.testing.assert_allclose(out[kept], levels[kept] * rescale, rtol=1e-6)
        # a single layer is its own top tier: rate = mask_rate; each level loses round(count · rate)
        for level in range(top + 1):
            at = codes == level
            assert kept[at].sum() == at.sum() - round(at.sum() * mask_rate)
    assert not np.array_equal(outs[0] != 0, outs[1] != 0)  # the drop is random, seeded


# ------------------------------------------------------------------ Delta-DCT (arXiv 2503.06676)

def deltadct_reference(d: np.ndarray, p: int, ratios=(0.2, 0.6, 0.2), widths=(2, 1, 0)) -> np.ndarray:
    """The paper's pipeline: p×p patches (zero-padded edges) ranked by L2 norm, the top shares at 2 / 1 /
    0 bits, 2-D orthonormal DCT-II of each kept patch, uniform quantisation between its min and max
    (fp16, rounded outward), inverse DCT, then one rescale so that mean |Δ̂| = mean |Δ| (Eq. 6).
    Share counts: the cumulative shares rounded down (the package's documented rounding)."""
    import scipy.fft

    m, n = d.shape
    gr, gc = -(-m // p), -(-n // p)
    padded = np.zeros((gr * p, gc * p), dtype=np.float64)
    padded[:m, :n] = d
    patches = padded.reshape(gr, p, gc, p).transpose(0, 2, 1, 3).reshape(-1, p, p)
    order = np.argsort(-np.linalg.norm(patches.reshape(len(patches), -1), axis=1), kind="stable")
    bounds = [0] + [int(sum(ratios[:i + 1]) * len(patches) + 1e-9) for i in range(len(ratios) - 1)] + [len(patches)]
    out = np.zeros_like(patches)
    for width, start, stop in zip(widths, bounds[:-1], bounds[1:], strict=True):
        if width == 0:
            continue
        for k in order[start:stop]:
            coef = scipy.fft.dctn(patches[k], norm="ortho")
            lo16, hi16 = np.float16(coef.min()), np.float16(coef.max())
            lo = np.nextafter(lo16, np.float16(-np.inf)) if lo16 > coef.min() else lo16
            hi = np.nextafter(hi16, np.float16(np.inf)) if hi16 < coef.max() else hi16
            lo, hi = float(lo), float(hi)
            step = (hi - lo) / (2 ** width - 1) if hi > lo else 1.0
            codes = np.clip(np.round((coef - lo) / step), 0, 2 ** width - 1)
            out[k] = scipy.fft.idctn(lo + codes * step, norm="ortho")
    approx = out.reshape(gr, gc, p, p).transpose(0, 2, 1, 3).reshape(gr * p, gc * p)[:m, :n]
    return approx * (np.abs(d).mean() / np.abs(approx).mean())


@pytest.mark.parametrize("p, shape", [(8, (40, 56)), (16, (64, 100))])
def test_deltadct_equals_the_paper_pipeline(p, shape):
    d = heavy_tailed(shape, seed=11)
    out = run("deltadct", d, patch_size=p, range_encoding="fp16")
    expected = deltadct_reference(d.astype(np.float64), p)
    # float32 DCTs against float64 ones: a coefficient exactly at a rounding boundary may land on the
    # neighbouring code, which moves the entries of that one patch; all else agrees to float32 precision.
    # How many boundary cases a shape meets depends on the CPU's float32 kernels (AVX2 and AVX-512 sum
    # in different orders), so the bound is on patches, not on a share of entries.
    close = np.isclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    rows, cols = np.nonzero(~close)
    flipped = {(r // p, c // p) for r, c in zip(rows, cols, strict=True)}
    assert len(flipped) <= 1
    elsewhere = np.ones(out.shape, dtype=bool)
    for r, c in flipped:
        elsewhere[r * p:(r + 1) * p, c * p:(c + 1) * p] = False
        # one code one step off: a small move of that patch, not a different patch
        assert np.linalg.norm((out - expected)[~elsewhere]) <= 0.05 * np.linalg.norm(expected)
    # elsewhere only float32 rounding and the flip's share of the layer's rescale (Eq. 6) remain:
    # 2e-7 measured without a flip, 1.5e-5 with one
    assert np.linalg.norm((out - expected)[elsewhere]) <= 1e-4 * np.linalg.norm(expected)
