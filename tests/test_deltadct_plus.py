"""Delta-DCT+ codec options: zero-centred quantisers, log-coded scales, separate DC, the low-rank head.

References are hand-computed values on small tensors and Max's (1960) table of Gaussian Lloyd–Max
levels; round trips are checked against a brute-force nearest level.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.fft
import torch
from safetensors.torch import save_file

import deltadct
from deltadct import codec
from deltadct import quant as Q
from deltadct.errors import ConfigError
from deltadct.methods.delta_come_rtn import DeltaCoMeRTN

#: the patch codec alone at the paper's shares (the preset adds a low-rank head and drops the DCT)
PATCH_ONLY = dict(lowrank_bits=0.0, transform="dct", ratios=(0.2, 0.6, 0.2))
#: J. Max, "Quantizing for minimum distortion" (1960), Table I: positive output levels for N(0, 1)
MAX_1960 = {1: [0.7979], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152],
            4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}


@pytest.mark.parametrize("bits", sorted(MAX_1960))
def test_lloyd_levels_match_max_table(bits):
    levels = Q._lloyd_max_gaussian(bits)
    positive = levels[len(levels) // 2:]
    np.testing.assert_allclose(positive, MAX_1960[bits], atol=6e-4)
    np.testing.assert_allclose(levels[:len(levels) // 2], [-v for v in reversed(positive)], atol=1e-12)
    unit = Q.unit_levels("lloyd", bits)
    assert unit[-1] == 1.0 and unit[0] == -1.0


def test_symmetric_unit_levels_by_hand():
    assert Q.unit_levels("symmetric", 1).tolist() == [-1.0, 1.0]
    np.testing.assert_allclose(Q.unit_levels("symmetric", 2).numpy(), [-1, -1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(Q.unit_levels("symmetric", 3).numpy(), np.arange(-7, 8, 2) / 7)
    with pytest.raises(ValueError, match="quantizer"):
        Q.unit_levels("minmax", 2)


def test_one_bit_scale_is_mean_abs_and_codes_are_signs():
    x = torch.tensor([[0.5, -1.5, 1.0, -1.0], [2.0, 0.0, -4.0, 2.0]])
    for quantizer in ("symmetric", "lloyd"):
        levels = Q.unit_levels(quantizer, 1)
        scale = Q.fit_scale(x, levels)
        torch.testing.assert_close(scale, torch.tensor([1.0, 2.0]))
        codes = Q.nearest_level(x, scale, levels)
        assert codes.tolist() == [[1, 0, 1, 0], [1, 0, 0, 1]]  # 0 ties to the lower level (−scale)
        assert Q.pack_bits(codes[0], 1).tolist() == [0b0101]


def test_two_bit_symmetric_scale_codes_and_bytes_by_hand():
    """x = (−3, −1, 1, 3) sits exactly on the 2-bit levels ±1/3, ±1 at scale 3."""
    x = torch.tensor([[-3.0, -1.0, 1.0, 3.0]])
    levels = Q.unit_levels("symmetric", 2)
    scale = Q.fit_scale(x, levels)
    torch.testing.assert_close(scale, torch.tensor([3.0]))
    codes = Q.nearest_level(x, scale, levels)
    assert codes.tolist() == [[0, 1, 2, 3]]
    assert Q.pack_bits(codes, 2).tolist() == [0b11100100]
    torch.testing.assert_close(Q.dequantize_levels(codes, scale, levels), x)


@pytest.mark.parametrize("quantizer", ["symmetric", "lloyd"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fitted_scale_is_near_the_brute_force_optimum(quantizer, bits):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    levels = Q.unit_levels(quantizer, bits)
    scale = Q.fit_scale(x, levels)

    def error(s):
        return (Q.dequantize_levels(Q.nearest_level(x, s, levels), s, levels) - x).pow(2).sum(1)

    grid = torch.linspace(0.5, 4.0, 701)
    best = torch.stack([error(torch.full((64,), float(g))) for g in grid]).amin(0)
    excess = error(scale) / best  # the error is not convex in the scale: a local search may miss a little
    assert float(excess.max()) < 1.03 and float(excess.mean()) < 1.002


def test_log_scale_codes_by_hand():
    """Scales 1, 2, 4 and 0 at 3 bits: log range (0, 2), step 2/6; codes 1, 4, 7 and 0."""
    fields, decoded = Q.encode_scale_log(torch.tensor([1.0, 2.0, 4.0, 0.0]), 3)
    codes = Q.unpack_bits(fields["scale_codes"], 3, 4)
    assert codes.tolist() == [1, 4, 7, 0]
    assert fields["scale_codes"].tolist() == [1 | 4 << 3 | (7 & 3) << 6, 7 >> 2]
    torch.testing.assert_close(fields["log_scale"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(decoded, torch.tensor([1.0, 2.0, 4.0, 0.0]))
    torch.testing.assert_close(Q.decode_scale_log(fields, 4, 3), decoded)


def test_log_scale_rounds_to_the_nearest_level():
    scales = torch.exp(torch.randn(300, generator=torch.Generator().manual_seed(0)) * 2)
    fields, decoded = Q.encode_scale_log(scales, 6)
    step = float(fields["log_scale"][1] - fields["log_scale"][0]) / 62
    assert (torch.log2(decoded / scales).abs() <= step / 2 + 1e-5).all()


def test_quantize_rows_symmetric_fields_by_hand():
    """Two 2×2 patches: widths 1 and 2, fp16 scales (1, 3) in patch order, codes packed per width."""
    rows = torch.tensor([[0.5, -1.5, 1.0, -1.0], [-3.0, -1.0, 1.0, 3.0]])
    widths = torch.tensor([1, 2], dtype=torch.uint8)
    opts = dict(range_encoding="fp16", range_bits=6, max_width=2, quantizer="symmetric")
    fields, dequant = codec.quantize_rows(rows, widths, **opts)
    assert fields["alloc"].tolist() == [1 | 2 << 2]
    assert fields["patch_scale"].dtype == torch.float16 and fields["patch_scale"].tolist() == [1.0, 3.0]
    assert fields["codes1"].tolist() == [0b0101] and fields["codes2"].tolist() == [0b11100100]
    assert "range" not in fields and "range_codes" not in fields
    expected = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-3.0, -1.0, 1.0, 3.0]])
    torch.testing.assert_close(dequant, expected)
    torch.testing.assert_close(codec.dequantize_rows(fields, 2, 4, **opts), expected)


@pytest.mark.parametrize("quantizer", ["symmetric", "lloyd"])
@pytest.mark.parametrize("range_encoding", ["log", "fp16"])
def test_round_trip_is_the_nearest_level_of_the_decoded_scale(real_deltas, quantizer, range_encoding):
    rows = codec.to_patches(real_deltas["2.weight"], 16, "dct")
    widths = torch.tensor([2, 1, 0, 3] * (rows.shape[0] // 4), dtype=torch.uint8)
    opts = dict(range_encoding=range_encoding, range_bits=6, max_width=3, quantizer=quantizer)
    fields, dequant = codec.quantize_rows(rows, widths, **opts)
    decoded = codec.dequantize_rows(fields, rows.shape[0], rows.shape[1], **opts)
    assert torch.equal(decoded, dequant)  # the decoder rebuilds exactly what the encoder computed
    assert (decoded[widths == 0] == 0).all()
    scales = (codec._decode_scales(fields, int((widths > 0).sum()), range_encoding, 6))
    kept = torch.nonzero(widths > 0).squeeze(1)
    for b in (1, 2, 3):
        sel = (widths[kept] == b).nonzero().squeeze(1)
        candidates = scales[sel].unsqueeze(1).unsqueeze(2) * Q.unit_levels(quantizer, b).float()
        nearest = (rows[kept[sel]].unsqueeze(2) - candidates).abs().amin(2)
        assert ((rows[kept[sel]] - decoded[kept[sel]]).abs() <= nearest + 1e-6).all()


def test_dc_coded_apart_by_hand():
    """DC codes: signed 4-bit on the layer's largest |DC| (7 steps a side); dropped rows store none."""
    rows = torch.tensor([[7.0, 1.0, -1.0, 1.0], [0.0, 5.0, 5.0, 5.0], [-3.5, 2.0, -2.0, 2.0]])
    widths = torch.tensor([1, 0, 1], dtype=torch.uint8)
    fields, rest = codec._split_dc(rows, widths, 4)
    assert rest.shape == (3, 3)
    assert Q.unpack_bits(fields["dc_codes"], 4, 2).tolist() == [14, 3]  # 7 + 7; round(−3.5) = −4 (half to even) + 7
    assert fields["dc_scale"].tolist() == [7.0]
    joined = codec._join_dc(fields, rest, widths, 4)
    assert joined[:, 0].tolist() == [7.0, 0.0, -4.0]
    assert torch.equal(joined[:, 1:], rest)


@pytest.mark.parametrize("options", [dict(PATCH_ONLY, quantizer="symmetric"),
                                     dict(PATCH_ONLY, quantizer="lloyd", rescale="lstsq"),
                                     dict(PATCH_ONLY, quantizer="symmetric", dc_bits=8),
                                     dict(PATCH_ONLY, quantizer="minmax", transform="dct_rows"),
                                     dict(PATCH_ONLY, quantizer="symmetric", transform="none", range_encoding="fp16"),
                                     dict(), dict(range_encoding="fp16", rescale="lstsq")])
def test_method_round_trip_file_and_measured_bits(options, tmp_path, real_pair):
    """Through a real file: reconstruct(file) equals the in-memory round trip, and bits/param is the
    file's bytes (the fields of every compressed tensor plus the header) over the parameters."""
    base, ft = real_pair
    out = tmp_path / "plus.safetensors"
    dfile = deltadct.compress(base, ft, method="deltadct_plus", out=out, progress=False, **options)
    info = deltadct.info(out)
    assert info["bits_per_param"] == pytest.approx((out.stat().st_size - info["kept_bytes"]) * 8 / info["num_params"])
    loaded = deltadct.format.load(out)
    method = deltadct.create_method("deltadct_plus", **options)
    for name in loaded.names("compressed"):
        fields = loaded.fields(name)
        entry = loaded.entries[name]
        assert entry["bytes"] == sum(t.numel() * t.element_size() for t in fields.values())
        shape = tuple(entry["shape"])
        assert torch.equal(loaded.reconstruct(name), method.reconstruct(deltadct.methods.Compressed(fields), shape))
    assert dfile.info()["bits_per_param"] == info["bits_per_param"]


def test_lowrank_head_plus_residual_codec(real_deltas):
    """With a head, the reconstruction is Delta-CoMe's head + the patch codec of the residual."""
    delta = real_deltas["2.weight"]
    plus = deltadct.create_method("deltadct_plus", lowrank_bits=0.5, ratios=(0, 0.5, 0.5))
    packed = plus.compress(delta, name="w")
    head = DeltaCoMeRTN(bits=0.5)
    head_part = head.reconstruct(head.compress(delta), delta.shape)
    residual_codec = deltadct.create_method("deltadct_plus", lowrank_bits=0.0, ratios=(0, 0.5, 0.5))
    rest = residual_codec.reconstruct(residual_codec.compress(delta - head_part), delta.shape)
    torch.testing.assert_close(plus.reconstruct(packed, delta.shape), head_part + rest, rtol=0, atol=1e-7)
    assert {k for k in packed.tensors if k.startswith("head_")} == {"head_range", "head_codes"}


def test_symmetric_one_bit_beats_paper_minmax_on_real_delta(real_deltas):
    """The measured claim behind the quantiser option: at the paper's 2/1/0 shares, sign × scale
    levels lose less than min/max levels on a real delta."""
    delta = real_deltas["2.weight"]

    def err(name, **cfg):
        m = deltadct.create_method(name, **cfg)
        return float((m.reconstruct(m.compress(delta), delta.shape) - delta).norm() / delta.norm())

    assert err("deltadct_plus", **PATCH_ONLY, quantizer="symmetric", rescale="none") < err("deltadct")


@pytest.mark.parametrize("options,match", [
    (dict(quantizer="nf4"), "quantizer"),
    (dict(quantizer="lloyd", bit_widths=(5, 1, 0), ratios=(0.1, 0.1, 0.8)), "exceed the 4 bits"),
    (dict(dc_bits=1), "dc_bits"),
    (dict(dc_bits=9), "dc_bits"),
    (dict(dc_bits=8, transform="none"), "needs transform 'dct'"),
    (dict(dc_bits=8, transform="dct_rows"), "needs transform 'dct'"),
    (dict(lowrank_bits=-0.5), "lowrank_bits"),
    (dict(transform="wavelet"), "transform"),
])
def test_bad_configs_are_one_line_config_errors(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        deltadct.create_method("deltadct_plus", **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("options", [dict(transform="dct_rows"), dict(quantizer="symmetric"), dict(dc_bits=8)])
def test_cuda_settings_the_kernels_lack_take_the_torch_path_with_a_log_line(options, caplog, monkeypatch):
    """No GPU is needed: the decision is made before any kernel is loaded."""
    monkeypatch.setattr(codec, "_load_kernels", lambda: pytest.fail("kernels must not be used"))
    codec._log_torch_fallback.cache_clear()
    settings = {"transform": "dct", "quantizer": "minmax", "dc_bits": 0, **options}
    assert not codec.fused_settings(**settings)
    with caplog.at_level(logging.INFO, logger="deltadct.codec"):
        assert codec._fused_kernels(torch.device("cuda"), (256, 256), 16, 2, **settings) is None
        assert not codec.graph_capturable(torch.device("cuda"), (256, 256), patch_size=16, bit_widths=(2, 1, 0),
                                          rescale="mean_abs", **settings)
    assert "torch path" in caplog.text


def test_paper_settings_still_take_the_fused_kernels(monkeypatch):
    sentinel = type("Kernels", (), {"supports": staticmethod(lambda *a: True), "PACKED_WIDTHS": (1, 2, 4, 8)})
    monkeypatch.setattr(codec, "_load_kernels", lambda: sentinel)
    assert codec.fused_settings("dct") and codec.fused_settings("none")
    assert codec._fused_kernels(torch.device("cuda"), (256, 256), 16, 2, "dct") is sentinel


def test_dct_rows_matches_scipy():
    x = np.random.default_rng(0).standard_normal((5, 8, 16))
    from deltadct.transforms import dct_rows, idct_rows

    got = dct_rows(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, scipy.fft.dct(x, type=2, norm="ortho", axis=-1), atol=1e-12)
    np.testing.assert_allclose(idct_rows(torch.from_numpy(got)).numpy(), x, atol=1e-12)


def test_plus_at_paper_settings_writes_the_paper_codec_fields(real_deltas):
    """deltadct_plus with the paper's quantiser and no head runs the same codec as deltadct."""
    delta = real_deltas["2.weight"]
    paper = deltadct.create_method("deltadct").compress(delta, name="w")
    plus = deltadct.create_method("deltadct_plus", **PATCH_ONLY, quantizer="minmax", rescale="mean_abs",
                                  dc_bits=0).compress(delta, name="w")
    assert list(paper.tensors) == list(plus.tensors)
    assert all(torch.equal(paper.tensors[k], plus.tensors[k]) for k in paper.tensors)


def test_file_of_a_saved_pair_is_deterministic(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, 64, generator=gen)}
    ft = {"w": base["w"] + 1e-3 * torch.randn(64, 64, generator=gen)}
    save_file(base, tmp_path / "b.safetensors")
    save_file(ft, tmp_path / "f.safetensors")
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.safetensors"
        deltadct.compress(tmp_path / "b.safetensors", tmp_path / "f.safetensors", method="deltadct_plus", out=out,
                          progress=False)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
