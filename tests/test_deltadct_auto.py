"""deltadct_auto: rate–distortion allocation under a measured on-disk budget."""
from __future__ import annotations

import itertools
import struct

import pytest
import torch

import deltadct
from deltadct import allocation as A
from deltadct import codec
from deltadct import patches as P
from deltadct.errors import ConfigError
from deltadct.methods import create_method
from deltadct.methods.base import as_matrix
from deltadct.quant import unpack_bits

PATCH = 8
#: at least the digits pair's header outside the compressed layers' entries (~1.5 KB: config, policy,
#: kept biases), for plans made without compress() measuring it
RESERVE = 2048


def compress(pair, method, **cfg):
    base, finetuned = pair
    return deltadct.compress(base, finetuned, method=method, progress=False, patch_size=PATCH, **cfg)


def stored_widths(dfile, name) -> torch.Tensor:
    """The per-patch widths a file actually holds (decoded from its allocation map)."""
    opts = dfile.method.codec_options()
    m, n = as_matrix(torch.empty(dfile.entries[name]["shape"], device="meta")).shape
    count = -(-m // PATCH) * -(-n // PATCH)
    return unpack_bits(dfile.fields(name)["alloc"], codec.alloc_bits_for(opts["max_width"]), count).long()


def estimated_error(dfile, deltas) -> float:
    """Σ over layers of the codec's exact per-patch quantisation error at the widths in the file."""
    total = 0.0
    for name in dfile.names("compressed"):
        rows = codec.to_patches(as_matrix(deltas[name]), PATCH, "dct")
        table = A.distortion_table(rows, 4, range_encoding="log", range_bits=6)
        total += float(table.gather(1, stored_widths(dfile, name).unsqueeze(1)).sum())
    return total


# -- the allocator's building blocks ------------------------------------------------------------
def test_distortion_table_matches_codec_roundtrip():
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(32, 48, generator=g)
    rows = codec.to_patches(matrix, PATCH, "dct")
    table = A.distortion_table(rows, 4, range_encoding="log", range_bits=6)
    assert torch.allclose(table[:, 0], matrix.reshape(4, 8, 6, 8).pow(2).sum(dim=(1, 3)).reshape(-1), rtol=1e-5)
    for width in range(1, 5):
        widths = torch.full((rows.shape[0],), width, dtype=torch.uint8)
        fields = codec.encode_layer(matrix, widths, patch_size=PATCH, transform="dct", range_encoding="log",
                                    range_bits=6, max_width=4, rescale="none")
        decoded = codec.decode_layer(fields, (32, 48), patch_size=PATCH, transform="dct", range_encoding="log",
                                     range_bits=6, max_width=4, rescale="none")
        # orthonormal DCT: coefficient-domain error == spatial error
        assert float(table[:, width].sum()) == pytest.approx(float((decoded - matrix).pow(2).sum()), rel=1e-4)


def brute_force(dist: torch.Tensor, rates: torch.Tensor, budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(range(dist.shape[1]), repeat=dist.shape[0]):
        if sum(float(rates[w]) for w in combo) <= budget:
            best = min(best, sum(float(dist[i, w]) for i, w in enumerate(combo)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_greedy_on_hull_is_near_optimal_and_within_budget(seed):
    g = torch.Generator().manual_seed(seed)
    # decreasing distortions with random (often non-convex) drops per extra bit
    dist = torch.rand(5, 5, generator=g).sort(dim=1, descending=True).values * torch.rand(5, 1, generator=g)
    rates = torch.tensor([0.0, 3.0, 5.0, 7.0, 9.0])
    slope, step_from, step_to = A.hull_steps(dist, rates)
    cost = rates[step_to.long()] - rates[step_from.long()]
    for budget in (0.0, 8.0, 17.0, 30.0, 45.0):
        widths = A.allocate_greedy(slope, cost, step_to, budget).long()
        assert float(rates[widths].sum()) <= budget
        got = float(dist.gather(1, widths.unsqueeze(1)).sum())
        # greedy on convex hulls is optimal up to the one step that did not fit (≤ max single-patch error)
        assert got <= brute_force(dist, rates, budget) + float(dist[:, 0].max()) + 1e-6
    widths = A.allocate_greedy(slope, cost, step_to, 1e9).long()
    assert torch.equal(widths, dist.argmin(dim=1))  # unlimited budget: every patch at its best width


# -- the method, measured from written files ----------------------------------------------------
@pytest.mark.parametrize("budget", [0.6, 1.0, 2.0])
def test_budget_never_exceeded_on_disk(real_pair, real_deltas, tmp_path, budget):
    """compress() measures the header outside the compressed layers itself: the default reserve suffices."""
    out = tmp_path / "auto.delta.safetensors"
    compress(real_pair, "deltadct_auto", out=out, budget=budget)
    dfile = deltadct.load(out)
    assert dfile.info()["bits_per_param"] <= budget
    # … and spent: only the header, the modelled per-layer overheads and less than one patch step
    # (4 bits × 64 + ranges) are left
    method = create_method("deltadct_auto", patch_size=PATCH)
    names = dfile.names("compressed")
    header_bytes = 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]  # safetensors: length prefix + JSON
    overhead = 8 * (header_bytes + method.config.header_reserve_bytes) + sum(
        method.layer_overhead_bits(n, tuple(real_deltas[n].shape), stored_widths(dfile, n).numel()) for n in names)
    payload = sum(dfile.entries[n]["bytes"] * 8 for n in names)
    assert payload >= budget * dfile.info()["num_params"] - overhead - float(method.width_rates()[-1])


def test_too_small_budget_is_a_clear_error(real_pair):
    with pytest.raises(ConfigError, match="budget"):
        compress(real_pair, "deltadct_auto", budget=0.01, header_reserve_bytes=RESERVE)


@pytest.mark.parametrize("share", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_allocation_beats_fixed_ratio_at_equal_payload(real_deltas, share):
    """On real deltas, for the payload the paper's ratios (a, 1−2a, a) spend, R-D allocation has less error."""
    method = create_method("deltadct_auto", patch_size=PATCH)
    rates = method.width_rates()
    tables, fixed_widths = [], []
    for delta in real_deltas.values():
        if min(delta.shape) < PATCH:
            continue
        rows = codec.to_patches(delta, PATCH, "dct")
        tables.append(A.distortion_table(rows, 4, range_encoding="log", range_bits=6))
        counts = P.allocation_counts(rows.shape[0], (share, 1 - 2 * share, share))
        fixed_widths.append(P.allocate(P.importance(P.patchify(delta, PATCH)), counts, (2, 1, 0)).long())
    table, fixed = torch.cat(tables), torch.cat(fixed_widths)
    payload = float(rates[fixed].sum())
    slope, step_from, step_to = A.hull_steps(table, rates)
    auto = A.allocate_greedy(slope, rates[step_to.long()] - rates[step_from.long()], step_to, payload).long()
    assert float(rates[auto].sum()) <= payload
    assert float(table.gather(1, auto[:, None]).sum()) < float(table.gather(1, fixed[:, None]).sum())


def test_file_error_matches_the_plan_estimate(real_pair, real_deltas, tmp_path):
    auto = compress(real_pair, "deltadct_auto", out=tmp_path / "auto.st", budget=1.5, header_reserve_bytes=RESERVE)
    # the estimate is the real error up to the layer's log range scale, which in the file is fitted to
    # the kept patches only; the lstsq rescale can only lower the real error further
    auto_err = sum(float((auto.reconstruct(n) - real_deltas[n]).pow(2).sum()) for n in auto.names("compressed"))
    assert auto_err <= estimated_error(auto, real_deltas) * 1.01


def test_zero_layers_get_no_bits():
    g = torch.Generator().manual_seed(0)
    deltas = [(f"layer{i}", torch.randn(128, 192, generator=g) * 0.01 if i % 2 else torch.zeros(128, 192))
              for i in range(6)]
    method = create_method("deltadct_auto", patch_size=PATCH, budget=1.0, header_reserve_bytes=0)
    method.plan(iter(deltas))
    for name, delta in deltas:
        stored = method.compress(delta, name=name)
        widths = unpack_bits(stored.tensors["alloc"], codec.alloc_bits_for(4), 16 * 24)
        if delta.abs().sum() == 0:
            assert int(widths.sum()) == 0 and not any(f.startswith("codes") for f in stored.tensors)
        else:
            assert int((widths > 0).sum()) > 0


def test_deterministic(real_pair, tmp_path):
    a = compress(real_pair, "deltadct_auto", out=tmp_path / "a.st", header_reserve_bytes=RESERVE)
    b = compress(real_pair, "deltadct_auto", out=tmp_path / "b.st", header_reserve_bytes=RESERVE)
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()
    assert a.info()["bits_per_param"] == b.info()["bits_per_param"]


def test_compress_without_plan_is_a_clear_error():
    method = create_method("deltadct_auto")
    with pytest.raises(ConfigError, match="plan"):
        method.compress(torch.zeros(32, 32), name="w")


@pytest.mark.parametrize("bad", [{"budget": 0}, {"max_width": 9}, {"weighting": "loud"}, {"rescale": "x"},
                                 {"header_reserve_bytes": -1}])
def test_bad_options(bad):
    with pytest.raises(ConfigError):
        create_method("deltadct_auto", **bad)


def test_norm_weighting_spreads_bits_to_small_layers():
    g = torch.Generator().manual_seed(0)
    deltas = [("big", torch.randn(256, 256, generator=g)), ("small", torch.randn(256, 256, generator=g) * 1e-3)]

    def kept(weighting):
        method = create_method("deltadct_auto", patch_size=PATCH, budget=1.0, header_reserve_bytes=0,
                               weighting=weighting)
        method.plan(iter(deltas))
        return int((method.planned_widths("small") > 0).sum())

    # uniform weighting: the 1000× smaller layer's error is negligible, so it gets (almost) nothing
    assert kept("uniform") < kept("norm")


def test_auto_vs_fixed_benchmark_runs_on_a_zoo_pair_with_new_heads(capsys):
    """benchmarks/auto_vs_fixed.py on the fast ViT zoo, whose task heads differ in shape from the
    base's: it uses the runner's tensor policy, and every row holds the errors it measured."""
    from conftest import load_benchmark_module

    bench = load_benchmark_module("auto_vs_fixed")
    bench.main(["--zoo", "vit:fast", "--tasks", "1", "--targets", "1.0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| vit-fast |")]
    assert len(rows) == 2  # the 1.0-bit target and the BitDelta-matched row
    target = rows[0].split("|")
    fixed_error, fixed_bits = float(target[4].split()[0]), float(target[4].split("(")[1].split(",")[0])
    auto_error, auto_bits = float(target[6].split()[0]), float(target[6].split("(")[1].rstrip(") "))
    assert 0 < fixed_error and 0 < auto_error < 2
    assert auto_bits <= fixed_bits + 1e-9  # auto's budget is the fixed file's measured bits
