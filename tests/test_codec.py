"""The Delta-DCT codec against an independent numpy/scipy implementation of the paper's algorithm."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

import deltadct
from deltadct import codec
from deltadct import quant as Q
from deltadct.patches import allocation_counts

FP16 = dict(range_encoding="fp16")


def _fp16_outward(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo16, hi16 = lo.astype(np.float16), hi.astype(np.float16)
    lo16 = np.where(lo16.astype(np.float64) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
    hi16 = np.where(hi16.astype(np.float64) < hi, np.nextafter(hi16, np.float16(np.inf)), hi16)
    return lo16.astype(np.float64), hi16.astype(np.float64)


def reference_deltadct(delta: np.ndarray, *, p: int = 16, ratios=(0.2, 0.6, 0.2), widths=(2, 1, 0),
                       transform: str = "dct") -> np.ndarray:
    """Paper's Delta-DCT written from scratch with numpy/scipy: L2 patch ranking, fixed-ratio 2/1/0
    bits, orthonormal DCT per patch, uniform min–max quantisation with fp16 ranges, no rescale."""
    m, n = delta.shape
    gr, gc = -(-m // p), -(-n // p)
    padded = np.zeros((gr * p, gc * p))
    padded[:m, :n] = delta
    blocks = padded.reshape(gr, p, gc, p).transpose(0, 2, 1, 3).reshape(-1, p, p)
    scores = np.linalg.norm(blocks.reshape(len(blocks), -1), axis=1)
    cumulative = np.floor(np.cumsum(ratios)[:-1] * len(blocks) + 1e-9).astype(int)
    ranked_widths = np.repeat(widths, np.diff(np.concatenate([[0], cumulative, [len(blocks)]])))
    patch_bits = np.empty(len(blocks), dtype=int)
    patch_bits[np.argsort(-scores, kind="stable")] = ranked_widths
    coeffs = scipy.fft.dctn(blocks, type=2, norm="ortho", axes=(1, 2)) if transform == "dct" else blocks
    out = np.zeros_like(coeffs)
    for i, b in enumerate(patch_bits):
        if b == 0:
            continue
        lo, hi = _fp16_outward(coeffs[i].min(keepdims=True), coeffs[i].max(keepdims=True))
        step = (hi - lo) / (2**b - 1) if hi > lo else np.ones(1)
        codes = np.clip(np.round((coeffs[i] - lo) / step), 0, 2**b - 1)
        out[i] = lo + codes * step
    if transform == "dct":
        out = scipy.fft.idctn(out, type=2, norm="ortho", axes=(1, 2))
    return out.reshape(gr, gc, p, p).transpose(0, 2, 1, 3).reshape(gr * p, gc * p)[:m, :n]


def rel_error(approx: torch.Tensor, delta: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approx - delta) / torch.linalg.vector_norm(delta))


def round_trip(delta: torch.Tensor, **cfg) -> torch.Tensor:
    method = deltadct.create_method("deltadct", **cfg)
    return method.reconstruct(method.compress(delta, name="w"), delta.shape)


@pytest.mark.parametrize("transform", ["dct", "none"])
@pytest.mark.parametrize("layer", ["0.weight", "2.weight"])
def test_codec_matches_numpy_reference_on_real_delta(real_deltas, transform, layer):
    delta = real_deltas[layer]
    got = round_trip(delta, transform=transform, rescale="none", **FP16)
    expected = reference_deltadct(delta.double().numpy(), transform=transform)
    step_scale = float(delta.abs().max())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5 * step_scale, rtol=0)


def test_codec_matches_reference_on_ragged_shape():
    """Sides that are not multiples of p: the padded edge patches are coded and cropped."""
    delta = torch.randn(40, 72, generator=torch.Generator().manual_seed(5)) * 1e-3
    got = round_trip(delta, patch_size=16, rescale="none", **FP16)
    expected = reference_deltadct(delta.double().numpy(), p=16)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-8, rtol=0)


def test_encode_decode_fields_on_real_delta(real_deltas):
    delta = real_deltas["2.weight"]  # 256×256 → 256 patches of 16×16
    opts = dict(patch_size=16, transform="dct", range_encoding="log", range_bits=6, max_width=2,
                rescale="mean_abs")
    widths = torch.tensor([2] * 51 + [1] * 154 + [0] * 51, dtype=torch.uint8)[torch.randperm(256)]
    fields = codec.encode_layer(delta, widths, **opts)
    assert Q.unpack_bits(fields["alloc"], 2, 256).tolist() == widths.tolist()
    assert fields["codes2"].numel() == 51 * 256 * 2 // 8 and fields["codes1"].numel() == 154 * 256 // 8
    assert fields["range_codes"].numel() == -(-205 * 2 * 6 // 8) and fields["scale"].numel() == 1
    out = codec.decode_layer(fields, tuple(delta.shape), **opts)
    assert out.shape == delta.shape and torch.isfinite(out).all()
    assert rel_error(out, delta) < 1.0
    # decoding needs nothing but the fields: a copy of them decodes identically
    again = codec.decode_layer({k: v.clone() for k, v in fields.items()}, tuple(delta.shape), **opts)
    assert torch.equal(out, again)


@pytest.mark.parametrize("transform", ["dct", "none"])
def test_mean_abs_rescale_restores_mean_magnitude(real_deltas, transform):
    """Paper Eq. 6: after rescaling, mean |Δ̂| equals the stored mean |Δ|."""
    for delta in real_deltas.values():
        if min(delta.shape) < 16:
            continue
        out = round_trip(delta, transform=transform, rescale="mean_abs")
        assert float(out.abs().mean()) == pytest.approx(float(delta.abs().mean()), rel=1e-5)


@pytest.mark.parametrize("range_encoding", ["fp16", "log"])
def test_lstsq_rescale_is_never_worse(real_deltas, range_encoding):
    for name, delta in real_deltas.items():
        if min(delta.shape) < 16:
            continue
        errs = {mode: rel_error(round_trip(delta, rescale=mode, range_encoding=range_encoding), delta)
                for mode in ("none", "mean_abs", "lstsq")}
        assert errs["lstsq"] <= errs["none"] + 1e-6, (name, errs)
        assert errs["lstsq"] <= errs["mean_abs"] + 1e-6, (name, errs)


def test_dct_beats_spatial_quantisation_on_low_rank_delta(synthetic):
    """The paper's premise: with the same bits, quantising DCT coefficients loses less than raw values."""
    delta = synthetic.heavy_tailed_delta((256, 256), torch.Generator().manual_seed(0))
    assert rel_error(round_trip(delta, transform="dct"), delta) < rel_error(round_trip(delta, transform="none"), delta)


def test_global_allocation_spends_exactly_the_ratios(real_deltas):
    """Across all layers together, 2/1/0-bit patch counts are what the ratios give for the total
    patch count, also when a frozen (all-zero) layer makes many scores tie."""
    deltas = {**{k: v for k, v in real_deltas.items() if min(v.shape) >= 16},
              "frozen.weight": torch.zeros(128, 256)}
    method = deltadct.create_method("deltadct", allocation="global")
    assert method.needs_plan
    method.plan(deltas.items())
    totals = np.zeros(3, dtype=int)
    for name, delta in deltas.items():
        packed = method.compress(delta, name=name)
        num_patches = (delta.shape[0] // 16) * (delta.shape[1] // 16)
        widths = Q.unpack_bits(packed.tensors["alloc"], 2, num_patches)
        totals += [(widths == b).sum().item() for b in (2, 1, 0)]
        assert torch.isfinite(method.reconstruct(packed, delta.shape)).all()
    assert totals.tolist() == allocation_counts(int(totals.sum()), (0.2, 0.6, 0.2))


def test_global_allocation_without_plan_is_a_config_error(real_deltas):
    method = deltadct.create_method("deltadct", allocation="global")
    with pytest.raises(deltadct.errors.ConfigError, match="plan"):
        method.compress(real_deltas["2.weight"], name="2.weight")


def test_layer_allocation_counts_per_layer(real_deltas):
    delta = real_deltas["0.weight"]  # 256×64 → 64 patches
    packed = deltadct.create_method("deltadct").compress(delta, name="0.weight")
    widths = Q.unpack_bits(packed.tensors["alloc"], 2, 64)
    assert [(widths == b).sum().item() for b in (2, 1, 0)] == allocation_counts(64, (0.2, 0.6, 0.2)) == [12, 39, 13]


@pytest.mark.parametrize("config", [dict(), dict(ratios=(0.1, 0.8, 0.1)), dict(ratios=(0.5, 0.0, 0.5)),
                                    dict(ratios=(0.3, 0.3, 0.4), bit_widths=(4, 1, 1), budget=1.9),
                                    dict(allocation="global")])
def test_host_width_counts_are_the_widths_histogram_and_change_nothing(real_deltas, config):
    """The counts the method hands the encoder (to spare a device read) are exactly the histogram of
    the widths it allocated, and encoding with them writes the same bytes as encoding without."""
    deltas = {k: v for k, v in real_deltas.items() if min(v.shape) >= 16}
    method = deltadct.create_method("deltadct", **config)
    method.plan(deltas.items())
    for name, delta in deltas.items():
        widths, counts = method.widths_for(method.scores(delta), name)
        assert counts == torch.bincount(widths.long(), minlength=max(method.config.bit_widths) + 1).tolist()
        with_counts = codec.encode_layer(delta, widths, width_counts=counts, **method.codec_options())
        without = codec.encode_layer(delta, widths, **method.codec_options())
        assert list(with_counts) == list(without)
        assert all(torch.equal(with_counts[k], without[k]) for k in without)
