"""The calibrated methods (``delta_come``, ``deltazip``) against references written here from their
published recipes, on top of the column-by-column GPTQ reference of ``test_gptq.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltadct
from deltadct.errors import ConfigError
from deltadct.gptq import hessian
from deltadct.methods import create_method
from deltadct.methods.delta_come import group_ranks
from test_gptq import correlated_inputs, reference_gptq


def fine_tuning_delta(m: int, n: int, seed: int) -> torch.Tensor:
    """A few strong directions plus dense noise, at the scale of a fine-tuning delta."""
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(m, 6, generator=gen) @ torch.randn(6, n, generator=gen)
    return (signal + 0.5 * torch.randn(m, n, generator=gen)) * 1e-3


def dequantized(codes, scale, zero, group_index):
    return scale[:, group_index] * (codes - zero[:, group_index])


def test_delta_come_is_gptq_of_v_then_u_with_the_projected_hessian():
    m, n = 64, 96
    delta = fine_tuning_delta(m, n, seed=1)
    x = correlated_inputs(300, n, seed=2).float()
    h = hessian(x.T @ x, len(x))
    options = dict(bits=2.0, bit_widths=[8, 3, 2], counts=[2, 5], group_size=16)
    method = create_method("delta_come", **options)
    ranks = group_ranks(m, n, method.config)
    assert ranks[:2] == [2, 5] and ranks[2] > 0  # the published counts are kept, not scaled
    approx = method.reconstruct(method.compress(delta, name="w", hessian=h), delta.shape)

    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    s16 = s.half().double().numpy()  # S is stored unquantised, in fp16
    expected, start = np.zeros((m, n)), 0
    for bits, k in zip(options["bit_widths"], ranks, strict=True):
        group = slice(start, start + k)
        # Vᵀ_g (k×n: x ↦ Vᵀx) with the layer inputs' Hessian, per direction in groups of 16 inputs
        codes, scale, zero, index, _ = reference_gptq(vt[group], h, bits=bits, group=16)
        v_hat = dequantized(codes, scale, zero, index)
        # U_g (m×k) with the Hessian of z = S_g V̂ᵀ_g x, i.e. P H Pᵀ for P = S_g V̂ᵀ_g
        p = s16[group, None] * v_hat
        hz = torch.from_numpy(p @ h.double().numpy() @ p.T)
        codes, scale, zero, index, _ = reference_gptq(u[:, group], hz, bits=bits, group=16)
        expected += (dequantized(codes, scale, zero, index) * s16[group]) @ v_hat
        start += k
    np.testing.assert_allclose(approx.double().numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_delta_come_beats_its_data_free_variant_on_the_calibration_outputs():
    m, n = 128, 256
    delta = fine_tuning_delta(m, n, seed=3)
    x = correlated_inputs(1000, n, seed=4).float()
    h = hessian(x.T @ x, len(x))

    def output_error(name):
        method = create_method(name)
        extra = {"hessian": h} if method.needs_calibration else {}
        packed = method.compress(delta, name="w", **extra)
        assert packed.payload_bytes * 8 <= 1.0 * delta.numel()  # both within the 1 bit/param budget
        approx = method.reconstruct(packed, delta.shape)
        return float(torch.linalg.vector_norm((approx - delta) @ x.T) / torch.linalg.vector_norm(delta @ x.T))

    assert output_error("delta_come") < 0.9 * output_error("delta_come_rtn")


def test_deltazip_is_the_two_to_four_sparsegpt_reference():
    m, n = 12, 30  # 30 columns: padded with 2 dead inputs to whole runs of 4
    delta = fine_tuning_delta(m, n, seed=5)
    x = correlated_inputs(200, n, seed=6).float()
    h = hessian(x.T @ x, len(x))
    method = create_method("deltazip")
    packed = method.compress(delta, name="w", hessian=h)
    approx = method.reconstruct(packed, delta.shape)

    padded_w = torch.nn.functional.pad(delta, (0, 2))
    padded_h = torch.nn.functional.pad(h, (0, 2, 0, 2))
    codes, scale, zero, index, pruned = reference_gptq(padded_w, padded_h, bits=2, group=32, act_order=False,
                                                       prune=(2, 4))
    expected = np.where(pruned, 0.0, dequantized(codes, scale, zero, index))[:, :n]
    np.testing.assert_allclose(approx.double().numpy(), expected, rtol=0, atol=1e-7)
    runs = torch.nn.functional.pad(approx, (0, 2)).reshape(m, -1, 4)
    assert ((runs == 0).sum(-1) >= 2).all()
    # 2 kept 2-bit codes + a 3-bit pattern per run of 4, an fp16 scale and a 2-bit zero point per row
    assert packed.payload_bytes == 12 * 8 * 4 // 8 + -(-12 * 8 * 3 // 8) + 2 * 12 + -(-12 * 2 // 8)


@pytest.mark.parametrize("name", ["delta_come", "deltazip"])
def test_calibrated_methods_refuse_a_missing_or_misshaped_hessian(name):
    method = create_method(name)
    delta = fine_tuning_delta(16, 24, seed=7)
    with pytest.raises(ConfigError, match="needs calibration data"):
        method.compress(delta, name="layer.w")
    with pytest.raises(ConfigError, match=r"shape \[20, 20\], expected \[24, 24\]"):
        method.compress(delta, name="layer.w", hessian=torch.eye(20))


def test_compress_without_calibration_fails_before_writing(tmp_path):
    base = {"w": torch.zeros(16, 24)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": fine_tuning_delta(16, 24, seed=8)}, tmp_path / "ft.safetensors")
    out = tmp_path / "d.safetensors"
    with pytest.raises(ConfigError, match="needs calibration data .* 1 have none, e.g. \\['w'\\]"):
        deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", method="delta_come", out=out,
                          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "ft.safetensors"]
