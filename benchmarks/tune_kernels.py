"""Time the fused Delta-DCT kernels over launch configurations, and each stage of one layer.

For patch sizes 16, 32 and 64 on a Llama-2-7B MLP-shaped matrix (11008×4096, fp32), every combination of
patches per program and warps per program is timed for the three kernels (kept ranges, encode,
decode; median of ``triton.testing.do_bench``), checked to write the same bytes as the shipped
configuration, and compared with the floor set by memory bandwidth (each kernel reads the matrix
or writes the reconstruction once). Then one layer's fused encode is timed stage by stage.

    python benchmarks/tune_kernels.py          # needs CUDA and Triton
"""
from __future__ import annotations

import itertools
import sys

import torch
import triton.testing

from bench_shapes import synthetic_delta  # run as a script: benchmarks/ is on sys.path
from deltadct import codec, kernels
from deltadct import quant as Q
from deltadct.methods import create_method

SHAPE = (11008, 4096)
#: (patches per program, warps) tried per patch size; fewer patches for the larger ones
LAUNCH_CONFIGS = {16: list(itertools.product((1, 2, 4, 8), (1, 2, 4, 8))),
                  32: list(itertools.product((1, 2, 4), (1, 2, 4, 8))),
                  64: list(itertools.product((1, 2), (1, 2, 4, 8)))}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def copy_bandwidth(matrix: torch.Tensor) -> float:
    """Bytes read + written per ms by a device-to-device copy of ``matrix``."""
    out = torch.empty_like(matrix)
    return 2 * matrix.numel() * 4 / bench(lambda: out.copy_(matrix))


def layer_inputs(matrix: torch.Tensor, patch_size: int):
    method = create_method("deltadct", patch_size=patch_size)
    widths, counts = method.widths_for(method.scores(matrix))
    ranks = kernels.width_ranks(widths, 2)
    return method, widths, counts, ranks


def run_config(matrix, patch_size, widths, counts, ranks):
    """(ms per kernel, outputs) of the three kernels at the module's current launch configuration."""
    options = dict(patch_size=patch_size, transform="dct")
    num_kept = sum(counts[1:])
    lo, hi = kernels.kept_ranges(matrix, widths, ranks, num_kept, **options)
    fields = kernels.encode_codes(matrix, widths, ranks, lo, hi, counts, max_width=2, **options)
    out, abs_sum = kernels.decode(fields, widths, ranks, lo, hi, SHAPE, max_width=2, **options)
    times = (bench(lambda: kernels.kept_ranges(matrix, widths, ranks, num_kept, **options)),
             bench(lambda: kernels.encode_codes(matrix, widths, ranks, lo, hi, counts, max_width=2, **options)),
             bench(lambda: kernels.decode(fields, widths, ranks, lo, hi, SHAPE, max_width=2, **options)))
    return times, (lo, hi, fields, out)


def same(a, b) -> bool:
    lo, hi, fields, out = a
    lo2, hi2, fields2, out2 = b
    return (torch.equal(lo, lo2) and torch.equal(hi, hi2) and all(torch.equal(fields[k], fields2[k]) for k in fields)
            and torch.equal(out, out2))


def stages(matrix: torch.Tensor, patch_size: int) -> list[tuple[str, float]]:
    """Milliseconds of each step of one fused, op-by-op encode and decode of ``matrix``."""
    method, widths, counts, ranks = layer_inputs(matrix, patch_size)
    options = dict(patch_size=patch_size, transform="dct")
    num_kept = sum(counts[1:])
    bf16 = matrix.to(torch.bfloat16)
    lo, hi = kernels.kept_ranges(matrix, widths, ranks, num_kept, **options)
    packed = create_method("deltadct", patch_size=patch_size, rescale="none").compress(matrix)
    return [
        ("bf16 → fp32", bench(lambda: bf16.float())),
        ("patch scores (patchify + L2)", bench(lambda: method.scores(matrix))),
        ("allocate (sort + scatter)", bench(lambda: method.widths_for(method.scores(matrix)))),
        ("width ranks (cumsum)", bench(lambda: kernels.width_ranks(widths, 2))),
        ("kept ranges kernel", bench(lambda: kernels.kept_ranges(matrix, widths, ranks, num_kept, **options))),
        ("range side information (log codes)", bench(lambda: Q.encode_range_log(lo, hi, 6))),
        ("encode kernel", bench(lambda: kernels.encode_codes(matrix, widths, ranks, lo, hi, counts, max_width=2,
                                                              **options))),
        ("rescale target (mean |Δ|)", bench(lambda: codec.rescale_target(matrix, None, "mean_abs"))),
        ("whole encode, op by op", bench(lambda: method._encode(bf16))),
        ("decode, op by op (no rescale)", bench(lambda: codec.decode_layer(
            packed.tensors, SHAPE, range_encoding="log", range_bits=6, max_width=2, rescale="none", **options))),
        ("compress, CUDA graph replay", bench(lambda: method.compress(bf16))),
        ("reconstruct, CUDA graph replay", bench(lambda: method.reconstruct(packed, SHAPE))),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    matrix = synthetic_delta(SHAPE, 0, torch.device("cuda")).float()
    bandwidth = copy_bandwidth(matrix)
    floor = matrix.numel() * 4 / bandwidth
    print(f"{SHAPE} fp32: copy bandwidth {bandwidth / 1e9:.2f} TB/s; one pass over the matrix ≥ {floor:.3f} ms\n")
    shipped = (dict(kernels.PATCHES_PER_PROGRAM), dict(kernels.NUM_WARPS))
    for p, combos in LAUNCH_CONFIGS.items():
        method, widths, counts, ranks = layer_inputs(matrix, p)
        reference_times, reference = run_config(matrix, p, widths, counts, ranks)
        print(f"p={p} (shipped: {shipped[0][p]} patches × {shipped[1][p]} warps per program)")
        print("| patches/program | warps | kept ranges ms | encode ms | decode ms | same bytes |")
        print("|---|---|---|---|---|---|")
        for g, w in combos:
            kernels.PATCHES_PER_PROGRAM[p], kernels.NUM_WARPS[p] = g, w
            try:
                times, outputs = run_config(matrix, p, widths, counts, ranks)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory or registers at this size
                print(f"| {g} | {w} | failed: {type(exc).__name__} |")
                continue
            print(f"| {g} | {w} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {same(outputs, reference)} |")
        kernels.PATCHES_PER_PROGRAM.update(shipped[0])
        kernels.NUM_WARPS.update(shipped[1])
        print()
    print(f"stages of one {SHAPE} layer at p=16 (shipped launch configuration):")
    for name, ms in stages(matrix, 16):
        print(f"  {name:40s} {ms:7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
