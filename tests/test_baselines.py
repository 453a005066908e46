"""Each baseline against an independent reference (numpy, hand-computed values, statistics),
plus BitDelta scale distillation on a real fine-tuning pair."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltadct
from conftest import digits_data, digits_mlp
from deltadct.distill import distill_bitdelta_scales
from deltadct.errors import ConfigError, NonFiniteError
from deltadct.methods import create_method
from deltadct.methods.delta_come_rtn import group_ranks
from deltadct.methods.lowrank import rank_for_budget


def gaussian(shape, seed=0, scale=1e-3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def roundtrip(name: str, delta: torch.Tensor, key: str = "w", **options) -> torch.Tensor:
    method = create_method(name, **options)
    return method.reconstruct(method.compress(delta, name=key), delta.shape)


def spectrum_delta(m: int, n: int, singular_values: np.ndarray, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U, V (numpy QR)."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return torch.from_numpy(((u * singular_values) @ v.T).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# bitdelta
# ---------------------------------------------------------------------------------------------
def test_bitdelta_is_sign_times_mean_abs_exactly():
    delta = gaussian((48, 70))
    d = delta.numpy()
    expected = np.sign(d) * np.float32(np.abs(d.astype(np.float64)).mean())
    assert np.array_equal(roundtrip("bitdelta", delta).numpy(), expected.astype(np.float32))


def test_bitdelta_zero_entries_get_the_positive_sign():
    delta = torch.tensor([[0.0, -2.0], [4.0, 0.0]])
    assert roundtrip("bitdelta", delta).tolist() == [[1.5, -1.5], [1.5, 1.5]]


# ---------------------------------------------------------------------------------------------
# lowrank
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, bits, rank", [((512, 1024), 1.0, 21), ((100, 30), 1.0, 1), ((10, 10), 1.0, 1),
                                               ((64, 64), 4.0, 8), ((8, 8), 64.0, 8)])
def test_lowrank_rank_from_budget(shape, bits, rank):
    # ⌊bits·m·n / (16·(m+n))⌋, clamped to 1..min(m, n)
    assert rank_for_budget(*shape, bits) == rank


def test_lowrank_equals_numpy_svd_truncation_up_to_fp16():
    delta = spectrum_delta(96, 160, 0.9 ** np.arange(96), seed=1)
    r = rank_for_budget(96, 160, 2.0)
    u, s, vt = np.linalg.svd(delta.numpy().astype(np.float64), full_matrices=False)
    expected = (u[:, :r] * s[:r]) @ vt[:r]
    out = roundtrip("lowrank", delta, bits=2.0).numpy()
    assert np.linalg.norm(out - expected) <= 2e-3 * np.linalg.norm(expected)  # fp16 factors: ~2⁻¹¹ each
    # and it really is rank r: the truncation error is the dropped spectrum (Eckart–Young)
    dropped = np.sqrt((s[r:] ** 2).sum())
    assert np.linalg.norm(out - delta.numpy()) == pytest.approx(dropped, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# dare
# ---------------------------------------------------------------------------------------------
def test_dare_keeps_one_minus_p_and_rescales_survivors():
    delta = gaussian((200, 300))
    p = 0.9
    out = roundtrip("dare", delta, p=p)
    kept = out != 0
    n = delta.numel()
    assert abs(float(kept.float().mean()) - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    expected = (delta[kept] / (1 - p)).to(torch.float16).float()
    assert torch.equal(out[kept], expected)
    # relative error of one draw: √(p/(1−p)) = 3 in expectation
    assert float((out - delta).norm() / delta.norm()) == pytest.approx(3.0, rel=0.05)


def test_dare_is_unbiased_over_seeds():
    delta = gaussian((32, 32))
    draws = 400
    mean = sum(create_method("dare", seed=s).reconstruct(create_method("dare", seed=s).compress(delta, name="w"),
                                                          delta.shape) for s in range(draws)) / draws
    # per-entry variance of the mean is Δ²·(p/(1−p))/draws, so the relative error is ≈ √(9/400) = 0.15
    assert float((mean - delta).norm() / delta.norm()) < 0.2


def test_dare_mask_depends_on_seed_and_name_only():
    delta = gaussian((40, 50))
    a = roundtrip("dare", delta, key="layer.0", seed=3)
    assert torch.equal(a, roundtrip("dare", delta, key="layer.0", seed=3))
    assert not torch.equal(a != 0, roundtrip("dare", delta, key="layer.1", seed=3) != 0)
    assert not torch.equal(a != 0, roundtrip("dare", delta, key="layer.0", seed=4) != 0)


def test_dare_uses_indices_when_sparser_than_one_in_32():
    delta = gaussian((100, 100))
    method = create_method("dare", p=0.99)
    packed = method.compress(delta, name="w")
    assert "index" in packed.tensors and "mask" not in packed.tensors
    kept = packed.tensors["index"].long()
    out = method.reconstruct(packed, delta.shape).reshape(-1)
    assert torch.equal(out[kept], (delta.reshape(-1)[kept] / (1 - 0.99)).half().float())
    assert int((out != 0).sum()) == kept.numel()
    assert packed.payload_bytes == kept.numel() * (4 + 2)


@pytest.mark.parametrize("name", ["dare", "magnitude", "lowrank"])
def test_values_beyond_fp16_are_refused_not_stored_as_inf(name):
    with pytest.raises(NonFiniteError, match="fp16"):
        create_method(name).compress(torch.full((4, 4), 7e4), name="w")


# ---------------------------------------------------------------------------------------------
# magnitude
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.1, 0.01, 1.0])
def test_magnitude_keeps_exactly_the_k_largest(density):
    delta = gaussian((64, 90), seed=5)
    out = roundtrip("magnitude", delta, density=density).numpy()
    d = delta.numpy().reshape(-1)
    k = round(density * d.size)
    top = set(np.argsort(-np.abs(d), kind="stable")[:k].tolist())
    assert set(np.flatnonzero(out.reshape(-1)).tolist()) == top
    assert np.array_equal(out.reshape(-1)[sorted(top)], d[sorted(top)].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bits, density", [(2.6, 0.1), (1.0, 1 / 48), (0.5, 1 / 96)])
def test_magnitude_density_from_bit_budget(bits, density):
    delta = gaussian((96, 128))
    method = create_method("magnitude", bits=bits)
    packed = method.compress(delta, name="w")
    assert packed.tensors["values"].numel() == round(density * delta.numel())
    assert packed.payload_bytes * 8 <= bits * delta.numel() + 16


# ---------------------------------------------------------------------------------------------
# rtn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size, shape", [(2, 128, (24, 256)), (3, 50, (17, 130)), (8, 7, (5, 3, 3, 3)),
                                                     (1, 16, (9, 40))])
def test_rtn_error_within_half_a_step_of_each_group_and_zero_is_exact(bits, group_size, shape):
    # rows scaled very differently, so a scale shared across groups or rows would break the bound
    delta = gaussian(shape, seed=2) * torch.logspace(-2, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    delta.view(shape[0], -1)[:, ::5] = 0.0
    out = roundtrip("rtn", delta, bits=bits, group_size=group_size).numpy().reshape(shape[0], -1)
    d = delta.numpy().reshape(shape[0], -1)
    levels = 2 ** bits - 1
    for start in range(0, d.shape[1], group_size):
        g, o = d[:, start:start + group_size], out[:, start:start + group_size]
        lo, hi = np.minimum(g.min(axis=1, keepdims=True), 0), np.maximum(g.max(axis=1, keepdims=True), 0)
        step = (hi - lo) / levels
        # grid ends move by half a step (integer zero point) and by the fp16 scale fraction's rounding (2⁻¹¹)
        assert (np.abs(o - g) <= step * (0.5 + levels * 2.0 ** -11) + 1e-12).all()
    assert (out[d == 0] == 0).all()


def test_rtn_keeps_tiny_and_huge_deltas_on_their_grid():
    # scales below fp16's normal range (6e-5) and above its maximum: stored as fractions of an fp32 maximum
    for magnitude in (1e-6, 1e5):
        delta = gaussian((8, 64), seed=4, scale=magnitude)
        out = roundtrip("rtn", delta, bits=4, group_size=32)
        step = (delta.reshape(8, 2, 32).amax(2).clamp(min=0) - delta.reshape(8, 2, 32).amin(2).clamp(max=0)) / 15
        assert ((out - delta).abs().reshape(8, 2, 32) <= step.unsqueeze(2) * (0.5 + 15 * 2.0 ** -11)).all()


# ---------------------------------------------------------------------------------------------
# delta_come_rtn (the data-free variant; delta_come is tested in test_calibrated_methods.py)
# ---------------------------------------------------------------------------------------------
def test_delta_come_rtn_group_sizes_follow_the_recipe():
    cfg = create_method("delta_come_rtn").config
    # 512×1024: ⌈512·2/4096⌉ = 1 at 8 bits, ⌈512·32/4096⌉ = 4 at 3 bits, the rest of the budget at 2 bits
    assert group_ranks(512, 1024, cfg) == [1, 4, (524288 - 12352 - 4 * 4672) // 3136]
    # a tight budget shrinks the later groups: 0.05·524288 = 26214 bits → one 8-bit direction (12352),
    # two 3-bit ones (9344) instead of four, and one 2-bit one (3136) from the 4518 bits left
    small = create_method("delta_come_rtn", bits=0.05).config
    assert group_ranks(512, 1024, small) == [1, 2, 1]
    # below the cost of one direction, the top direction is kept anyway
    assert group_ranks(512, 1024, create_method("delta_come_rtn", bits=0.001).config) == [1, 0, 0]


def test_delta_come_rtn_at_high_precision_is_nearly_exact():
    delta = spectrum_delta(64, 64, np.linspace(1.0, 0.1, 64))
    out = roundtrip("delta_come_rtn", delta, bits=20.0, bit_widths=[8], rank_fractions=[])
    assert float((out - delta).norm() / delta.norm()) < 0.02


def test_delta_come_rtn_beats_lowrank_at_the_same_measured_bits(tmp_path):
    m, n = 256, 512
    delta = spectrum_delta(m, n, np.arange(1, m + 1) ** -0.5, seed=3)
    base = {"w": gaussian((m, n), seed=9, scale=0.05)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": base["w"] + delta}, tmp_path / "ft.safetensors")
    def measure(name, **options):
        info = deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", method=name,
                                 progress=False, **options).info()
        return info["bits_per_param"], info["layers"]["w"]["rel_error"]

    come_bits, come_error = measure("delta_come_rtn")
    # lowrank's rank moves in steps of 16·(m+n) bits: give it the first rank at or above delta_come's file size
    low_bits, low_error = measure("lowrank", bits=come_bits)
    assert low_bits >= come_bits
    assert come_error < 0.9 * low_error, (come_error, low_error)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def test_none_is_exact_and_zero_is_zero():
    delta = gaussian((30, 40))
    assert torch.equal(roundtrip("none", delta), delta)
    assert torch.equal(roundtrip("zero", delta), torch.zeros_like(delta))


def test_zero_file_holds_no_compressed_bytes(tmp_path):
    base = {"w": gaussian((64, 64), seed=1)}
    save_file(base, tmp_path / "b.safetensors")
    save_file({"w": base["w"] + 1e-3}, tmp_path / "f.safetensors")
    out = tmp_path / "zero.safetensors"
    deltadct.compress(tmp_path / "b.safetensors", tmp_path / "f.safetensors", method="zero", out=out,
                      progress=False)
    dfile = deltadct.load(out)
    assert dfile.entries["w"]["bytes"] == 0
    raw = out.read_bytes()
    assert len(raw) == 8 + int.from_bytes(raw[:8], "little")  # the header and nothing after it
    applied = deltadct.apply(tmp_path / "b.safetensors", out, progress=False)
    assert torch.equal(applied["w"], base["w"])


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, option", [
    ("dare", {"p": -0.1}, "p"), ("dare", {"p": 1.0}, "p"),
    ("magnitude", {"density": 0.0}, "density"), ("magnitude", {"density": 1.5}, "density"),
    ("magnitude", {"bits": 0}, "bits"),
    ("rtn", {"bits": 0}, "bits"), ("rtn", {"bits": 9}, "bits"), ("rtn", {"group_size": 0}, "group_size"),
    ("rtn", {"bits": 2.5}, "bits"),
    ("lowrank", {"bits": 0}, "bits"), ("lowrank", {"bits": -1}, "bits"),
    ("delta_come_rtn", {"bits": 0}, "bits"),
    ("delta_come_rtn", {"bit_widths": [9, 2], "rank_fractions": [0.1]}, "bit_widths"),
    ("delta_come_rtn", {"rank_fractions": [0.1]}, "rank_fractions"),
    ("delta_come_rtn", {"rank_fractions": [0.7, 0.6]}, "rank_fractions"),
])
def test_bad_options_name_the_option_and_value(name, options, option):
    with pytest.raises(ConfigError, match=option):
        create_method(name, **options)


# ---------------------------------------------------------------------------------------------
# BitDelta scale distillation on a real fine-tuning pair (digits → mirrored digits)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill_setup(real_pair, real_pair_states):
    base_state, ft_state = real_pair_states
    base, teacher = digits_mlp(), digits_mlp()
    base.load_state_dict(base_state)
    teacher.load_state_dict(ft_state)
    x, _ = digits_data(mirrored=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    calibration = [x[order[i:i + 64]] for i in range(0, 512, 64)]
    held_out = x[order[1000:]]
    dfile = deltadct.compress(*real_pair, method="bitdelta", progress=False)
    return dfile, base, teacher, calibration, held_out


def _held_out_logit_mse(dfile, real_pair, teacher, held_out) -> float:
    student = digits_mlp()
    student.load_state_dict(deltadct.apply(real_pair[0], dfile, progress=False))
    with torch.no_grad():
        return float(((student(held_out) - teacher(held_out)) ** 2).mean())


def test_distillation_lowers_the_logit_error(distill_setup, real_pair, tmp_path):
    dfile, base, teacher, calibration, held_out = distill_setup
    tuned, report = distill_bitdelta_scales(dfile, base, teacher, calibration, steps=20, lr=3e-2)
    assert report.matrices == len(dfile.names("compressed"))
    assert report.loss_after < report.loss_before
    before = _held_out_logit_mse(dfile, real_pair, teacher, held_out)
    after = _held_out_logit_mse(tuned, real_pair, teacher, held_out)
    assert after < 0.85 * before, (before, after)

    # only the scales moved; the file keeps its layout and size and loads back with a valid checksum
    for name in dfile.names("compressed"):
        old, new = dfile.fields(name), tuned.fields(name)
        assert torch.equal(old["signs"], new["signs"])
        assert not torch.equal(old["scale"], new["scale"])
    path = tuned.save(tmp_path / "distilled.safetensors")
    reloaded = deltadct.load(path)
    assert {n: e["bytes"] for n, e in reloaded.entries.items()} == {n: e["bytes"] for n, e in dfile.entries.items()}
    assert reloaded.header["distillation"]["steps"] == 20
    for name in dfile.names("compressed"):  # recorded errors describe the new scales
        assert reloaded.entries[name]["rel_error"] == pytest.approx(
            float((tuned.reconstruct(name) - (teacher.state_dict()[name] - base.state_dict()[name])).norm()
                  / (teacher.state_dict()[name] - base.state_dict()[name]).norm()), abs=1e-5)


def test_distillation_refuses_other_methods_and_unmatched_models(distill_setup, real_pair):
    dfile, base, teacher, calibration, _ = distill_setup
    rtn = deltadct.compress(*real_pair, method="rtn", progress=False)
    with pytest.raises(ConfigError, match="bitdelta"):
        distill_bitdelta_scales(rtn, base, teacher, calibration)
    with pytest.raises(ConfigError, match="state_dict"):
        distill_bitdelta_scales(dfile, torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), calibration)
    with pytest.raises(ConfigError, match="calibration"):
        distill_bitdelta_scales(dfile, base, teacher, [])
