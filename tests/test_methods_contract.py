"""The contract every registered compression method keeps (parametrised over ``list_methods()``).

A new method is covered by adding its module: shapes/dtype/finiteness, error no worse than storing
nothing, determinism, odd and conv shapes, bit-exact reconstruction from a real file, config
validation and a ``conf/method/<name>.yaml`` matching its defaults. The measured size of a
512×1024 delta is checked against a hand-computed payload for every method that has one. Methods
that need calibration data get the Hessian of synthetic correlated inputs.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import deltadct
from deltadct.errors import ConfigError, UnknownMethodError
from deltadct.gptq import hessian
from deltadct.methods import create_method, get_method_class, list_methods
from deltadct.methods.base import matrix_shape

REPO = Path(__file__).resolve().parents[1]
METHODS = list_methods()
#: options for the small synthetic tensors of these tests, where a default is meant for whole models
SMALL_INPUT_OPTIONS = {
    # its budget is measured on the file and reserves 16 KB for a model's header by default, more
    # than a 100×100 test delta's whole budget, and each layer's header entry (~1 KB) is charged too
    "deltadct_auto": {"header_reserve_bytes": 0, "budget": 8.0},
}


def small_method(name: str):
    return create_method(name, SMALL_INPUT_OPTIONS.get(name))


def low_rank_plus_noise(shape: tuple[int, ...], rank: int = 8, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """A fine-tuning-like delta: a few strong directions plus dense small noise, of any shape."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape[0], math.prod(shape[1:])
    signal = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / math.sqrt(rank)
    return ((signal + noise * torch.randn(m, n, generator=gen)) * 1e-3).reshape(shape)


def synthetic_hessian(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """H = 2·XᵀX/n of random inputs with unequal, correlated features, for a delta of ``shape``."""
    cols = matrix_shape(tuple(shape))[1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * cols + 16, cols, generator=gen)  # drawn before the mixing matrix, as always
    x = x @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    return hessian(x.T @ x, len(x))


def calibration_options(method, shapes: dict[str, tuple[int, ...]]) -> dict:
    """``calibration=`` for deltadct.compress when the method needs it, else nothing."""
    return {"calibration": {k: synthetic_hessian(s) for k, s in shapes.items()}} if method.needs_calibration else {}


def compress_one(method, delta: torch.Tensor, name: str = "layer.weight"):
    if method.needs_plan:
        method.plan([(name, delta)])
    if method.needs_calibration:
        return method.compress(delta, name=name, hessian=synthetic_hessian(delta.shape))
    return method.compress(delta, name=name)


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))


def error_bound(name: str) -> float:
    """Relative error a method may reach: 1.0 (storing nothing) except DARE and UltraDelta.

    DARE is unbiased but not error-reducing: rescaling survivors by 1/(1−p) leaves a relative
    error of √(p/(1−p)) (3.0 at p = 0.9), which is the method, not a defect; its own tests check that value.
    """
    if name == "dare":
        p = get_method_class("dare").Config().p
        return 1.1 * math.sqrt(p / (1 - p))
    if name == "ultradelta":  # the same random drop and 1/(1−p) rescale, on 4-bit values
        p = get_method_class("ultradelta").Config().mask_rate
        return 1.2 * math.sqrt(p / (1 - p))
    return 1.0


@pytest.mark.parametrize("shape", [(96, 160), (32, 16, 3, 3), (37, 53)], ids=["matrix", "conv", "odd"])
@pytest.mark.parametrize("name", METHODS)
def test_reconstruct_shape_dtype_finite_and_error(name, shape):
    delta = low_rank_plus_noise(shape)
    method = small_method(name)
    out = method.reconstruct(compress_one(method, delta), shape)
    assert tuple(out.shape) == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_error(out, delta) <= error_bound(name)


@pytest.mark.parametrize("name", METHODS)
def test_compress_is_deterministic(name):
    delta = low_rank_plus_noise((64, 80))
    first = compress_one(small_method(name), delta)
    second = compress_one(small_method(name), delta.clone())
    assert sorted(first.tensors) == sorted(second.tensors)
    assert first.meta == second.meta
    for field in first.tensors:
        assert torch.equal(first.tensors[field], second.tensors[field]), field


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2, 1, 1), (200,)], ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_tiny_shapes_work_or_are_refused_up_front(name, shape):
    """Either the shape compresses, or check_shape refuses it with a ConfigError (and compress agrees)."""
    delta = low_rank_plus_noise(shape, rank=1) if len(shape) > 1 else torch.linspace(-1e-3, 1e-3, shape[0])
    method = small_method(name)
    try:
        method.check_shape(shape, "tiny")
    except ConfigError:
        with pytest.raises(ConfigError):
            compress_one(method, delta, "tiny")
        return
    out = method.reconstruct(compress_one(method, delta, "tiny"), shape)
    assert tuple(out.shape) == shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# a real file: compress → write → load → reconstruct equals the in-memory result bit for bit
# ---------------------------------------------------------------------------------------------
PAIR_SHAPES = {"blocks.0.attn.weight": (64, 96), "blocks.0.conv.weight": (32, 16, 3, 3),
               "blocks.1.odd.weight": (37, 53), "blocks.0.attn.bias": (64,)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=gen) * 0.05 for k, s in PAIR_SHAPES.items()}
    fine = {k: base[k] + low_rank_plus_noise(s, seed=i) if len(s) > 1 else base[k] + 1e-3
            for i, (k, s) in enumerate(PAIR_SHAPES.items())}
    root = tmp_path_factory.mktemp("pair")
    save_file(base, root / "base.safetensors")
    save_file(fine, root / "finetuned.safetensors")
    deltas = {k: fine[k].float() - base[k].float() for k in PAIR_SHAPES}
    return root / "base.safetensors", root / "finetuned.safetensors", deltas


@pytest.mark.parametrize("name", METHODS)
def test_file_roundtrip_is_bit_exact(name, pair, tmp_path):
    base, finetuned, deltas = pair
    out = tmp_path / f"{name}.safetensors"
    method = small_method(name)
    deltadct.compress(base, finetuned, method=name, out=out, progress=False, **SMALL_INPUT_OPTIONS.get(name, {}),
                      **calibration_options(method, PAIR_SHAPES))
    dfile = deltadct.load(out)
    compressed = dfile.names("compressed")
    assert "blocks.0.attn.weight" in compressed and "blocks.0.attn.bias" not in compressed

    if method.needs_plan:
        method.plan((k, deltas[k]) for k in compressed)
    for key in compressed:
        in_memory = method.compress(deltas[key], name=key, **(
            {"hessian": synthetic_hessian(PAIR_SHAPES[key])} if method.needs_calibration else {}))
        expected = method.reconstruct(in_memory, deltas[key].shape)
        assert torch.equal(dfile.reconstruct(key), expected), key
        # the same payload after a device move (a copy on CPU-only machines) decodes identically
        moved = method.reconstruct(in_memory.to("cpu"), deltas[key].shape)
        assert torch.equal(moved, expected), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_reconstruct_on_cuda_matches_cpu(name):
    delta = low_rank_plus_noise((64, 96))
    method = small_method(name)
    packed = compress_one(method, delta)
    on_cpu = method.reconstruct(packed, delta.shape)
    on_gpu = method.reconstruct(packed.to("cuda"), delta.shape)
    assert on_gpu.device.type == "cuda"
    # the same codes: only float32 summation order differs (cuBLAS vs the CPU's DCT products), a few ulps
    # of the delta's largest entry (3e-9 of 1e-4-sized entries measured on an H200 for deltadct_auto)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-4 * on_cpu.abs().max().item())
    gpu_packed = compress_one(small_method(name), delta.cuda())
    assert torch.isfinite(method.reconstruct(gpu_packed, delta.shape)).all()


# ---------------------------------------------------------------------------------------------
# measured size of a 512×1024 delta vs. the payload computed by hand
# ---------------------------------------------------------------------------------------------
ROWS, COLS = 512, 1024
NUMEL = ROWS * COLS
#: payload bits/param at the defaults, from each method's recipe (file = payload + JSON/index header)
EXPECTED_PAYLOAD_BITS = {
    # 1 sign bit per parameter + one fp32 scale
    "bitdelta": 1 + 32 / NUMEL,
    # BitDelta's layout (its scales are distilled afterwards, by the runner)
    "bitdelta_distilled": 1 + 32 / NUMEL,
    # rank ⌊1·512·1024 / (16·1536)⌋ = 21 factors of 1536 fp16 numbers
    "lowrank": 21 * (ROWS + COLS) * 16 / NUMEL,
    # directions of (8·1536+64), (3·1536+64), (2·1536+64) bits: 1 (⌈512·2/4096⌉), 4 (⌈512·32/4096⌉),
    # then ⌊(524288 − 12352 − 4·4672) / 3136⌋ = 157
    "delta_come_rtn": (1 * 12352 + 4 * 4672 + 157 * 3136) / NUMEL,
    # bytes, Vᵀ k×1024 and U 512×k per group (8 groups of 128 inputs; one U group while k ≤ 128):
    # the act-order group of each input, 1024 × 3 bits = 384; S, 2 per direction;
    # 8 bits, k=2: V 2048 codes + 32 scales + 16 zeros, U 1024 + 1024 + 512 → 4656 (+4 S);
    # 3 bits, k=32: V 12288 + 512 + 96, U 6144 + 1024 + 192 → 20256 (+64 S);
    # 2 bits, k: V 256k + 16k + 2k, U 128k + 1024 + 128, S 2k → 404k + 1152 ≤ 65536 − 25364 → k = 96
    "delta_come": (384 + 4656 + 4 + 20256 + 64 + 404 * 96 + 1152) * 8 / NUMEL,
    # 2-bit codes of the 2 kept entries of every 4, a 3-bit pattern per 4, fp16 scale + 2-bit zero per row
    "deltazip": (2 * NUMEL / 2 + 3 * NUMEL / 4 + ROWS * (16 + 2)) / NUMEL,
    # round(0.1·N) = 52429 fp16 values + a 1-bit mask
    "magnitude": 1 + 16 * 52429 / NUMEL,
    # 2-bit codes + an fp16 scale fraction and a 2-bit zero point per 128 entries + the fp32 largest scale
    "rtn": 2 + 18 / 128 + 32 / NUMEL,
    "none": 32.0,
    "zero": 0.0,
    # ⌊0.2·N⌋ = 104857 kept: a 1-bit mask, ⌈104857/8⌉ bytes of signs, one fp32 scale
    "compeft": (NUMEL + 8 * math.ceil(104857 / 8) + 32) / NUMEL,
}
#: methods whose payload is random or set by an allocation: (lowest, highest) payload bits/param
EXPECTED_PAYLOAD_RANGE = {
    # 1-bit mask + 16·(kept fraction); kept fraction 0.1 ± 4σ (σ = √(0.09/N))
    "dare": (1 + 16 * (0.1 - 4 * 0.3 / math.sqrt(NUMEL)), 1 + 16 * (0.1 + 4 * 0.3 / math.sqrt(NUMEL))),
    # 1.0 bit of codes; side information: a 2-bit width per 256-entry patch (0.0078) and two 6-bit range
    # codes per kept patch (≤ 0.047), plus two scalars
    "deltadct": (1.0, 1.0 + 2 / 256 + 12 / 256 + 0.001),
    # its budget is measured on the file itself (header included)
    "deltadct_auto": (0.0, 1.0),
    # 1 sign bit per parameter + one fp16 scale per row (512) or per column (1024)
    "bitdelta_axis": (1 + 16 * ROWS / NUMEL, 1 + 16 * COLS / NUMEL),
    # one matrix is one third-tier of its own: it drops the mean rate 0.97 → 15729 kept entries
    # (±4σ of the per-level rounding: 16 levels), 4-bit codes + int32 indices, plus the fp32 (min, max)
    "ultradelta": ((round(0.03 * NUMEL) - 8) * 36 / NUMEL, ((round(0.03 * NUMEL) + 8) * 36 + 64 + 8) / NUMEL),
    # head: Delta-CoMe at 0.5 bit (within one 2-bit direction, 3136 bits, below it); patches: 0.1·2 + 0.3·1
    # bits of codes, a 2-bit width per patch and one 6-bit scale code per kept patch (40 %), plus scalars
    "deltadct_plus": (0.5 + 0.5 - 3136 / NUMEL, 0.5 + 0.5 + 2 / 256 + 0.4 * 6 / 256 + 0.001),
}
#: JSON header + safetensors index of a one-tensor file: a few KB at most (0.04 bits/param here)
HEADER_BITS = 0.04


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    gen = torch.Generator().manual_seed(2)
    base = {"layer.weight": torch.randn(ROWS, COLS, generator=gen) * 0.05}
    fine = {"layer.weight": base["layer.weight"] + low_rank_plus_noise((ROWS, COLS), rank=16, seed=3)}
    root = tmp_path_factory.mktemp("big_pair")
    save_file(base, root / "base.safetensors")
    save_file(fine, root / "finetuned.safetensors")
    return root / "base.safetensors", root / "finetuned.safetensors"


@pytest.mark.parametrize("name", METHODS)
def test_measured_bits_per_param_match_the_recipe(name, big_pair, tmp_path):
    if name not in EXPECTED_PAYLOAD_BITS and name not in EXPECTED_PAYLOAD_RANGE:
        pytest.skip(f"no hand-computed size for {name!r}: add it to EXPECTED_PAYLOAD_BITS/RANGE")
    out = tmp_path / "d.safetensors"
    deltadct.compress(*big_pair, method=name, out=out, progress=False, record_errors=False,
                      **calibration_options(create_method(name), {"layer.weight": (ROWS, COLS)}))
    info = deltadct.load(out).info()
    assert info["num_params"] == NUMEL
    measured = info["bits_per_param"]
    assert measured == pytest.approx(out.stat().st_size * 8 / NUMEL)
    payload = sum(e["bytes"] for e in deltadct.load(out).entries.values()) * 8 / NUMEL
    if name in EXPECTED_PAYLOAD_BITS:
        assert payload == pytest.approx(EXPECTED_PAYLOAD_BITS[name], abs=1e-9)
    elif name == "deltadct_auto":
        lo, hi = EXPECTED_PAYLOAD_RANGE[name]
        assert lo < measured <= hi
    else:
        lo, hi = EXPECTED_PAYLOAD_RANGE[name]
        assert lo <= payload <= hi
    assert 0 < measured - payload <= HEADER_BITS


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_a_config_error(name):
    with pytest.raises(ConfigError, match="no_such_option"):
        create_method(name, no_such_option=1)


def _wrong_typed(hint) -> object | None:
    """A value of the wrong type for a field annotation (None when the field takes anything)."""
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint in (int, float):
        return "not-a-number"
    if hint is str:
        return 123
    if typing.get_origin(hint) in (tuple, list):
        return ["not-a-number"] if typing.get_args(hint)[0] in (int, float) else None
    if hint is bool:
        return "maybe"
    return None


@pytest.mark.parametrize("name", METHODS)
def test_wrong_typed_options_are_config_errors(name):
    cls = get_method_class(name).Config
    hints = typing.get_type_hints(cls)
    checked = 0
    for field in dataclasses.fields(cls):
        bad = _wrong_typed(hints[field.name])
        if bad is None:
            continue
        with pytest.raises(ConfigError, match=field.name):
            create_method(name, **{field.name: bad})
        checked += 1
    assert checked >= 1  # at least ``seed``


def test_unknown_method_is_reported_with_the_choices():
    with pytest.raises(UnknownMethodError, match="bitdelta"):
        create_method("no-such-method")


@pytest.mark.parametrize("name", METHODS)
def test_hydra_method_config_lists_exactly_the_defaults(name):
    path = REPO / "conf" / "method" / f"{name}.yaml"
    assert path.is_file(), f"conf/method/{name}.yaml is missing"
    values = yaml.safe_load(path.read_text())
    assert values.pop("name") == name
    defaults = get_method_class(name).Config().to_dict()
    assert values == defaults
    create_method(name, values)  # and they validate
