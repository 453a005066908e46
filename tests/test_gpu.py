"""Delta-DCT on CUDA: same file layout and (within float tolerance) the same numbers as on the CPU.

CPU and GPU files are *not* byte-identical in general: the DCT is a matrix product whose float32
summation order differs between cuBLAS and the CPU BLAS, so a coefficient sitting on a rounding
boundary of the quantiser can land one code apart, and patch scores one ulp apart can swap two
patches across an allocation boundary. What must hold, and is tested here:

* the file structure (fields, shapes, dtypes) is identical, and the bit allocation nearly so;
* when the allocation is identical almost every code is (< 0.1 % differ), and reconstructions
  agree to 1e-2 relative, far below the codec's own error (~0.8 relative at 1 bit/param). Measured
  on an H100 (benchmarks/device_parity.py, Llama-2-7B shapes): typically 4e-4; 6e-3 where one
  patch in 8000 swapped allocation class; p=32 on 4096×4096 was byte-identical;
* a file written on one device decodes on the other to the same tensor within 1e-5 relative;
* the GPU result is deterministic run to run, and the encoder syncs with the host a fixed few
  times per layer (3 measured on torch 2.11: the per-width patch counts among them), never once
  per patch group or bit width.

Skipped cleanly without CUDA.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from deltadct.methods import create_method

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(512, 768), (300, 1000), (1024, 256)]


def heavy_tailed(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((3, *shape), generator=gen).square().sum(0) / 3
    return (z / chi2.sqrt() * 1e-3).to(torch.bfloat16).float()


def rel(a, b):
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


@pytest.mark.parametrize("patch_size", [8, 16, 32])
@pytest.mark.parametrize("range_encoding", ["log", "fp16"])
def test_cpu_and_gpu_agree(patch_size, range_encoding):
    method = create_method("deltadct", patch_size=patch_size, range_encoding=range_encoding)
    for i, shape in enumerate(SHAPES):
        delta = heavy_tailed(shape, i)
        cpu = method.compress(delta)
        gpu = method.compress(delta.cuda())
        assert set(cpu.tensors) == set(gpu.tensors)
        for key in cpu.tensors:
            assert gpu.tensors[key].device.type == "cuda"
            assert gpu.tensors[key].shape == cpu.tensors[key].shape and gpu.tensors[key].dtype == cpu.tensors[key].dtype
        alloc_diff = (cpu.tensors["alloc"] != gpu.tensors["alloc"].cpu()).float().mean().item()
        assert alloc_diff < 0.01
        if alloc_diff == 0:  # a swapped patch shifts every later code of its class
            for key in (k for k in cpu.tensors if k.startswith("codes")):
                frac = (cpu.tensors[key] != gpu.tensors[key].cpu()).float().mean().item()
                assert frac < 1e-3, (key, frac)
        rec_cpu = method.reconstruct(cpu, shape)
        rec_gpu = method.reconstruct(gpu, shape)
        assert rec_gpu.device.type == "cuda"
        assert rel(rec_gpu.cpu(), rec_cpu) < 1e-2
        # the codec's own error is three orders of magnitude larger than the device difference
        assert rel(rec_cpu, delta) > 0.1
        # cross-device decode of one file: only the inverse DCT's rounding differs
        assert rel(method.reconstruct(cpu.to("cuda"), shape).cpu(), rec_cpu) < 1e-5
        assert rel(method.reconstruct(gpu.to("cpu"), shape), rec_gpu.cpu()) < 1e-5


def test_gpu_deterministic_and_few_syncs():
    method = create_method("deltadct", patch_size=16)
    delta = heavy_tailed((1024, 1024), 7).cuda()
    method.compress(delta)  # warm-up: first calls may sync for lazy initialisation
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            first = method.compress(delta)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught
             if "synchronizing CUDA operation" in str(w.message)]  # not the "prototype feature" notice
    assert len(syncs) <= 4, syncs
    second = method.compress(delta)
    for key in first.tensors:
        assert torch.equal(first.tensors[key], second.tensors[key]), key


def test_api_compress_on_gpu_applies_on_cpu(tmp_path):
    from safetensors.torch import save_file

    import deltadct

    base = {f"layer{i}.weight": heavy_tailed((256, 384), 10 + i) * 100 for i in range(2)}
    ft = {k: (v + heavy_tailed(v.shape, 20 + i)).contiguous() for i, (k, v) in enumerate(base.items())}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    out_gpu, out_cpu = tmp_path / "gpu.delta.safetensors", tmp_path / "cpu.delta.safetensors"
    deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", out=out_gpu, device="cuda",
                      progress=False)
    deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", out=out_cpu, device="cpu",
                      progress=False)
    assert out_gpu.stat().st_size == out_cpu.stat().st_size
    applied_gpu = deltadct.apply(tmp_path / "base.safetensors", out_gpu, progress=False)
    applied_cpu = deltadct.apply(tmp_path / "base.safetensors", out_cpu, progress=False)
    for key, value in ft.items():
        delta = value - base[key]
        assert rel(applied_gpu[key] - base[key], applied_cpu[key] - base[key]) < 1e-3
        assert rel(applied_gpu[key] - base[key], delta) < 1.0


# ---------------------------------------------------------------------------------------------
# the fused Triton path (deltadct/kernels.py) against the torch path on the same GPU
# ---------------------------------------------------------------------------------------------
FUSED_SHAPES = [(512, 768), (300, 1000), (72, 40), (1024, 256)]


def _both_paths(monkeypatch, method, delta):
    """(fused, torch-path) compressions of one CUDA delta."""
    from deltadct import codec

    fused = method.compress(delta)
    with monkeypatch.context() as patch:
        patch.setattr(codec, "use_fused_kernels", False)
        reference = method.compress(delta)
    return fused, reference


def _torch_reconstruct(monkeypatch, method, compressed, shape):
    from deltadct import codec

    with monkeypatch.context() as patch:
        patch.setattr(codec, "use_fused_kernels", False)
        return method.reconstruct(compressed, shape)


@pytest.mark.parametrize("patch_size", [8, 16, 32, 64])
@pytest.mark.parametrize("range_encoding", ["log", "fp16"])
@pytest.mark.parametrize("transform", ["dct", "none"])
def test_fused_kernels_match_torch_path(monkeypatch, patch_size, range_encoding, transform):
    pytest.importorskip("triton")
    method = create_method("deltadct", patch_size=patch_size, range_encoding=range_encoding, transform=transform)
    for i, shape in enumerate(s for s in FUSED_SHAPES if min(s) >= patch_size):
        delta = heavy_tailed(shape, 40 + i).cuda()
        fused, reference = _both_paths(monkeypatch, method, delta)
        assert list(fused.tensors) == list(reference.tensors)  # same fields, in the same order
        for key, ref in reference.tensors.items():
            got = fused.tensors[key]
            assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device, key
            if key == "log_range":  # the smallest coefficient magnitude may be an ulp apart
                assert torch.allclose(got, ref, rtol=1e-6, atol=0), key
            elif key == "scale" or key == "alloc":  # computed by the same torch code
                assert torch.equal(got, ref), key
            else:  # codes and range codes: only rounding ties between the two DCTs' summation orders
                frac = (got != ref).float().mean().item()
                assert frac < 1e-3, (key, frac)
        # one file, two decoders: only float rounding apart
        rec = method.reconstruct(fused, shape)
        rec_torch = _torch_reconstruct(monkeypatch, method, fused, shape)
        assert rec.shape == shape and rec.dtype == torch.float32 and torch.isfinite(rec).all()
        assert rel(rec, rec_torch) < 1e-5
        # and the codec's error is the same whichever path wrote the file
        err_fused = rel(rec, delta)
        err_torch = rel(_torch_reconstruct(monkeypatch, method, reference, shape), delta)
        assert abs(err_fused - err_torch) < 1e-3 * err_torch


def test_fused_path_falls_back_for_widths_it_cannot_pack(monkeypatch):
    """3-bit patches do not fill whole bytes: the layer takes the torch path, bit for bit."""
    pytest.importorskip("triton")
    from deltadct import codec

    delta = heavy_tailed((256, 384), 3).cuda()
    widths = torch.randint(0, 4, (16 * 24,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).cuda()
    options = dict(patch_size=16, transform="dct", range_encoding="log", range_bits=6, max_width=3,
                   rescale="mean_abs")
    fused = codec.encode_layer(delta, widths, **options)
    with monkeypatch.context() as patch:
        patch.setattr(codec, "use_fused_kernels", False)
        reference = codec.encode_layer(delta, widths, **options)
        rec_reference = codec.decode_layer(reference, (256, 384), **options)
    assert list(fused) == list(reference)
    for key in reference:
        assert torch.equal(fused[key], reference[key]), key
    assert torch.equal(codec.decode_layer(fused, (256, 384), **options), rec_reference)


def test_fused_path_never_syncs():
    """With per-layer ratios the widths' counts are known on the host: neither compress nor
    reconstruct waits for the GPU, so the host queues layer after layer."""
    pytest.importorskip("triton")
    method = create_method("deltadct", patch_size=16)
    delta = heavy_tailed((1024, 1024), 8).cuda()
    method.reconstruct(method.compress(delta), (1024, 1024))  # warm-up: kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compressed = method.compress(delta)
        method.reconstruct(compressed, (1024, 1024))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# CUDA graph replay of the fused path (deltadct/graphs.py)
# ---------------------------------------------------------------------------------------------
def test_graph_cache_replays_fresh_inputs_and_keeps_results():
    from deltadct.graphs import GraphCache

    cache = GraphCache(max_graphs=2)

    def fn(x):
        return {"scaled": x * 2 + x.sum(), "rows": x.abs().amax(dim=1)}

    results = []
    for seed in range(3):
        x = heavy_tailed((64, 48), seed).cuda()
        results.append((x, cache.run("fn", fn, x)))
    for x, out in results:  # each result is its own input's, not overwritten by later replays
        expected = fn(x)
        assert all(torch.equal(out[k], expected[k]) for k in expected)
    for shape in ((32, 48), (16, 48)):
        cache.run("fn", fn, heavy_tailed(shape, 9).cuda())
    assert len(cache) == 2  # least recently used graph dropped


@pytest.mark.parametrize("config", [dict(patch_size=16), dict(patch_size=32, range_encoding="fp16"),
                                    dict(patch_size=16, transform="none"), dict(patch_size=64),
                                    dict(patch_size=16, ratios=(0.5, 0.0, 0.5)),
                                    dict(patch_size=16, bit_widths=(4, 2, 0), ratios=(0.1, 0.2, 0.7), budget=1.0)])
def test_cuda_graphs_write_the_op_by_op_bytes(monkeypatch, config):
    pytest.importorskip("triton")
    from deltadct import codec

    graphed = create_method("deltadct", **config)
    for i, shape in enumerate([(512, 768), (300, 1000), (512, 768)]):
        delta = heavy_tailed(shape, 60 + i).to(torch.bfloat16).cuda()
        assert graphed._graphed(delta.device, shape)
        packed = graphed.compress(delta)
        with monkeypatch.context() as patch:
            patch.setattr(codec, "use_cuda_graphs", False)
            eager = create_method("deltadct", **config)
            reference = eager.compress(delta)
            rec_reference = eager.reconstruct(reference, shape)
        assert list(packed.tensors) == list(reference.tensors)
        for key in reference.tensors:
            assert torch.equal(packed.tensors[key], reference.tensors[key]), key
        assert torch.equal(graphed.reconstruct(packed, shape), rec_reference)
    assert len(graphed._graph_cache) == 4  # encode and decode for each of the two shapes


def test_cuda_graphs_not_used_where_the_layer_syncs():
    pytest.importorskip("triton")
    device = torch.device("cuda")
    assert not create_method("deltadct", patch_size=8)._graphed(device, (512, 512))  # no kernel for p=8
    assert not create_method("deltadct", rescale="lstsq")._graphed(device, (512, 512))
    assert not create_method("deltadct", allocation="global")._graphed(device, (512, 512))
    assert not create_method("deltadct", bit_widths=(3, 1, 0), ratios=(0.1, 0.7, 0.2))._graphed(device, (512, 512))
    assert not create_method("deltadct")._graphed(torch.device("cpu"), (512, 512))
