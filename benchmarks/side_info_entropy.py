"""Would entropy coding pay? Every stored field of Delta-DCT files, raw against two generic lossless
coders of the Python standard library (zlib level 9, lzma preset 9) and against its order-0 byte
entropy (the size an ideal per-byte entropy coder such as a static rANS/Huffman stage would reach).

Fields, for the paper's default (p = 16, 2/1/0 bits at 0.2/0.6/0.2, 6-bit log ranges): ``codes1`` and
``codes2`` the packed 1- and 2-bit DCT codes, ``alloc`` the packed per-patch widths, ``range_codes``
and ``log_range`` the side information, ``scale`` the Eq. 6 rescale. Measured on real fine-tuning
deltas: the MiniLM fast zoo's SST-2 and CoLA pairs and the fast ViT zoo's four pairs (built when absent).

    python benchmarks/side_info_entropy.py [--out results/benchmarks/cpu-side-info-entropy.md]
"""
from __future__ import annotations

import argparse
import lzma
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

import deltadct
from experiments.zoo import build_zoo, zoo_policy

PAIRS = (("minilm", ("sst2", "cola")), ("vit", ("digits", "parity", "geq5", "rotated")))


def order0_bytes(data: bytes) -> float:
    """Order-0 (byte-histogram) entropy of ``data``, in bytes."""
    if not data:
        return 0.0
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum() * len(data) / 8)


def field_bytes(family: str, tasks: tuple[str, ...]) -> tuple[dict[str, bytes], int]:
    """Each field's bytes concatenated over every compressed matrix of the family's pairs, and the
    number of compressed parameters."""
    entry = build_zoo(family, "fast", progress=False)
    fields: dict[str, bytearray] = defaultdict(bytearray)
    params = 0
    for task in tasks:
        dfile = deltadct.compress(entry.base_path, entry.tasks[task].path, "deltadct", progress=False,
                                  policy=zoo_policy(family))
        for name in dfile.names("compressed"):
            params += int(np.prod(dfile.entries[name]["shape"]))
            for field, tensor in dfile.fields(name).items():
                fields[field] += tensor.contiguous().view(-1).numpy().view(np.uint8).tobytes()
    return {k: bytes(v) for k, v in fields.items()}, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = ["# Entropy coding of Delta-DCT's stored fields (paper defaults, fast zoos)", "",
             "Bits per compressed parameter of each field: as stored, after zlib -9, after lzma -9, and its "
             "order-0 byte entropy.", ""]
    for family, tasks in PAIRS:
        fields, params = field_bytes(family, tasks)
        lines += [f"## {family} fast zoo, tasks {', '.join(tasks)} ({params / 1e6:.2f} M compressed parameters)", "",
                  "| field | stored | zlib | lzma | order-0 entropy |", "|---|---:|---:|---:|---:|"]
        totals = np.zeros(4)
        for field in sorted(fields):
            data = fields[field]
            sizes = np.array([len(data), len(zlib.compress(data, 9)), len(lzma.compress(data, preset=9)),
                              order0_bytes(data)])
            # a coder never stores more than the raw bytes (it would keep them raw)
            sizes[1:] = np.minimum(sizes[1:], sizes[0])
            totals += sizes
            lines.append(f"| {field} | " + " | ".join(f"{8 * s / params:.4f}" for s in sizes) + " |")
        lines += ["| all fields | " + " | ".join(f"**{8 * s / params:.4f}**" for s in totals) + " |", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
