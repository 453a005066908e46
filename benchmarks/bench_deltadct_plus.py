"""Compress / reconstruct time of Delta-DCT+ options against the paper's Delta-DCT, on one device.

The deltas are the synthetic RoBERTa-base-shaped ones of ``benchmarks/synthetic.py`` (72 matrices,
85 M parameters with all 12 layers). Each setting compresses and reconstructs every matrix, best of
``--repeats`` passes; the table gives seconds and the ratio to the paper's ``deltadct``.

    python benchmarks/bench_deltadct_plus.py --layers 2 --threads 2

Writes ``results/benchmarks/<device>-deltadct-plus.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from deltadct.methods import create_method

HERE = Path(__file__).resolve().parent
#: the patch codec alone at the paper's shares (deltadct_plus's defaults add a head and drop the DCT)
PATCH_ONLY = {"transform": "dct", "lowrank_bits": 0.0, "ratios": [0.2, 0.6, 0.2], "rescale": "none"}
#: (label, method, options); the first row is the reference of the ratios
SETTINGS = [
    ("deltadct (paper)", "deltadct", {}),
    ("quantizer symmetric", "deltadct_plus", {**PATCH_ONLY, "quantizer": "symmetric"}),
    ("quantizer lloyd", "deltadct_plus", {**PATCH_ONLY, "quantizer": "lloyd"}),
    ("symmetric + dc_bits 8", "deltadct_plus", {**PATCH_ONLY, "quantizer": "symmetric", "dc_bits": 8}),
    ("symmetric, transform none", "deltadct_plus", {**PATCH_ONLY, "quantizer": "symmetric", "transform": "none"}),
    ("delta_come_rtn (its head alone)", "delta_come_rtn", {"bits": 0.5}),
    ("deltadct_plus (preset)", "deltadct_plus", {}),
]


def _synthetic():
    spec = importlib.util.spec_from_file_location("benchmarks_synthetic", HERE / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="RoBERTa-base layers (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    deltas = _synthetic().roberta_base_deltas(layers=args.layers)
    params = sum(d.numel() for d in deltas.values())
    rows = []
    for label, name, options in SETTINGS:
        method = create_method(name, options)
        packed = {}

        def compress():
            for key, delta in deltas.items():
                packed[key] = method.compress(delta, name=key)

        def reconstruct():
            for key, delta in deltas.items():
                method.reconstruct(packed[key], delta.shape)

        t_compress = best_time(compress, args.repeats)
        t_reconstruct = best_time(reconstruct, args.repeats)
        bits = sum(c.payload_bytes for c in packed.values()) * 8 / params
        rows.append((label, t_compress, t_reconstruct, bits))
        print(f"{label:30s} compress {t_compress:.3f} s  reconstruct {t_reconstruct:.3f} s  "
              f"payload {bits:.3f} bits/param",
              file=sys.stderr, flush=True)
    ref_c, ref_r = rows[0][1], rows[0][2]
    lines = [f"Delta-DCT+ options vs the paper's Delta-DCT: RoBERTa-base-shaped synthetic deltas, {args.layers} "
             f"layer(s), {params / 1e6:.1f} M parameters, CPU, {args.threads} thread(s), best of {args.repeats}.",
             "", "| setting | compress s | × paper | reconstruct s | × paper | payload bits/param |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, tc, tr, bits in rows:
        lines.append(f"| {label} | {tc:.3f} | {tc / ref_c:.2f} | {tr:.3f} | {tr / ref_r:.2f} | {bits:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out) if args.out else HERE.parent / "results" / "benchmarks" / "cpu-deltadct-plus.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
