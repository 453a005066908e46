"""Uniform quantisation, bit packing, and the side-information (range) encodings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deltadct import quant as Q


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantization_error_at_most_half_a_step(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randn(50, 64, generator=gen) * torch.rand(50, 1, generator=gen) * 3
    lo, hi = values.amin(1), values.amax(1)
    codes = Q.quantize(values, lo, hi, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    approx = Q.dequantize(codes, lo, hi, bits)
    step = ((hi - lo) / ((1 << bits) - 1)).unsqueeze(1)
    assert ((approx - values).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # the range end points are levels, so they come back (up to float rounding)
    torch.testing.assert_close(approx.amin(1), lo, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(approx.amax(1), hi, atol=1e-6, rtol=1e-6)


def test_quantize_constant_row_is_exact():
    values = torch.full((2, 5), 0.25)
    codes = Q.quantize(values, values[:, 0], values[:, 0], 2)
    assert torch.equal(Q.dequantize(codes, values[:, 0], values[:, 0], 2), values)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 7, 8, 13, 257])
def test_pack_unpack_round_trip_and_size(bits, count):
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(count * 10 + bits),
                          dtype=torch.int64).to(torch.uint8)
    packed = Q.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-count * bits // 8) == Q.packed_size(count, bits)
    assert torch.equal(Q.unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_matches_a_reference_bit_stream(bits):
    """Bit j of code i sits at stream position i·bits + j, LSB first in each byte (numpy reference)."""
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=19)
    stream = np.array([(c >> j) & 1 for c in codes for j in range(bits)], dtype=np.uint8)
    expected = np.packbits(stream, bitorder="little")
    got = Q.pack_bits(torch.from_numpy(codes.astype(np.uint8)), bits).numpy()
    np.testing.assert_array_equal(got, expected)


def test_pack_bits_hand_made_bytes():
    # 2-bit codes 1,2,3,0 → 01 | 10<<2 | 11<<4 | 00<<6 = 0b00111001
    assert Q.pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 1-bit 1,0,1,1,0,0,0,1 | 1 → 0b10001101, then 0b00000001
    assert Q.pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x8D, 0x01]
    # 3-bit 5,6,7 → bits 101 011 111 (LSB first) → 0b11110101, 0b00000001
    assert Q.pack_bits(torch.tensor([5, 6, 7], dtype=torch.uint8), 3).tolist() == [0b11110101, 0b1]


def test_pack_rejects_bad_widths_and_sizes():
    with pytest.raises(ValueError, match="1..8"):
        Q.pack_bits(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="expected 1"):
        Q.unpack_bits(torch.zeros(2, dtype=torch.uint8), 2, 4)


def _ranges(seed: int, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges over many decades, as DCT patches of real deltas give (lo ≤ 0 ≤ hi, heavy tails)."""
    gen = torch.Generator().manual_seed(seed)
    lo = -torch.rand(n, generator=gen).pow(3) * torch.exp(3 * torch.randn(n, generator=gen))
    hi = torch.rand(n, generator=gen) * torch.exp(3 * torch.randn(n, generator=gen))
    return lo, hi


@pytest.mark.parametrize("seed", range(10))
def test_fp16_range_covers_and_round_trips(seed):
    lo, hi = _ranges(seed)
    fields, dlo, dhi = Q.encode_range_fp16(lo, hi)
    assert (dlo <= lo).all() and (dhi >= hi).all()
    assert fields["range"].dtype == torch.float16 and fields["range"].shape == (len(lo), 2)
    rlo, rhi = Q.decode_range_fp16(fields, len(lo))
    assert torch.equal(rlo, dlo) and torch.equal(rhi, dhi)
    # outward rounding costs at most one fp16 ulp (relative 2^-10) beyond the normal range floor
    assert ((lo - dlo).abs() <= lo.abs() * 2**-10 + 2**-24).all()


@pytest.mark.parametrize("bits", [2, 5, 6, 7, 8])
@pytest.mark.parametrize("seed", range(10))
def test_log_range_covers_and_round_trips(bits, seed):
    lo, hi = _ranges(seed)
    fields, dlo, dhi = Q.encode_range_log(lo, hi, bits)
    assert (dlo <= lo).all() and (dhi >= hi).all()
    assert fields["range_codes"].numel() == -(-2 * len(lo) * bits // 8)
    assert fields["log_range"].dtype == torch.float32 and fields["log_range"].numel() == 2
    rlo, rhi = Q.decode_range_log(fields, len(lo), bits)
    assert torch.equal(rlo, dlo) and torch.equal(rhi, dhi)


def test_log_range_at_6_bits_hand_checked():
    """Codes are 6-bit: 0 = zero, 1..63 = 2^(log_lo + (k−1)·step) over the layer's magnitude range."""
    lo = torch.tensor([-1.0, 0.0, -0.5])
    hi = torch.tensor([2.0**-6, 2.0**-3, 1.0])
    fields, dlo, dhi = Q.encode_range_log(lo, hi, 6)
    codes = Q.unpack_bits(fields["range_codes"], 6, 6).reshape(3, 2)
    assert codes[1, 0] == 0 and dlo[1] == 0  # an exact zero costs a code, not a range
    assert codes.max() == 63 and codes[codes > 0].min() == 1  # the layer's max and min magnitudes
    log_lo, log_hi = fields["log_range"].tolist()
    assert log_lo == pytest.approx(-6, abs=1e-4) and log_hi == pytest.approx(0, abs=1e-4)
    step = (log_hi - log_lo) / 62
    # every decoded magnitude is the smallest level at or above the true one
    mags = torch.stack([-lo, hi], 1)
    decoded = torch.stack([-dlo, dhi], 1)
    for m, d, c in zip(mags.flatten().tolist(), decoded.flatten().tolist(), codes.flatten().tolist(), strict=True):
        if m == 0:
            continue
        assert d >= m and d / m < 2 ** step * (1 + 1e-5)
        assert d == pytest.approx(2 ** (log_lo + (c - 1) * step), rel=1e-6)


def test_log_range_all_zero_rows():
    fields, dlo, dhi = Q.encode_range_log(torch.zeros(4), torch.zeros(4), 6)
    assert torch.equal(dlo, torch.zeros(4)) and torch.equal(dhi, torch.zeros(4))
    rlo, rhi = Q.decode_range_log(fields, 4, 6)
    assert torch.equal(rlo, torch.zeros(4)) and torch.equal(rhi, torch.zeros(4))


def test_quantize_asymmetric_by_hand():
    # group 1: lo −1, hi 2 at 2 bits → scale 1, zero round(1) = 1, q = round(x) + 1 (0.5 rounds to even 0)
    # group 2 (shorter, all positive): range widened to [0, 6] → scale 2, zero 0, q = round(x / 2)
    values = torch.tensor([[-1.0, 0.5, 2.0, 3.0, 6.0]])
    codes, scale, zero = Q.quantize_asymmetric(values, 2, 3)
    assert codes.tolist() == [[0, 1, 3, 2, 3]] and scale.tolist() == [[1.0, 2.0]] and zero.tolist() == [[1, 0]]
    assert Q.dequantize_asymmetric(codes, scale, zero, 3).tolist() == [[-1.0, 0.0, 2.0, 4.0, 6.0]]
    # an all-zero group sits on its zero point whatever the step
    codes, scale, zero = Q.quantize_asymmetric(torch.zeros(2, 4), 3, 4)
    assert Q.dequantize_asymmetric(codes, scale, zero, 4).abs().sum() == 0
