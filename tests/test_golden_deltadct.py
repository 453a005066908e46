"""The paper's ``deltadct`` writes exactly the bytes it always wrote for its default settings.

A fixed small pair (drawn from numpy's seeded PCG64, so it does not depend on torch's RNG) is
compressed with the default config and with the paper's fp16 min/max side information. Two sha256
values per variant are compared with the committed ones: the tensor section (every stored tensor's
name, dtype, shape and bytes: codes, allocation maps, ranges, scales) and the header's description of
the compression (method, config, format version, per-entry fields, byte counts and errors). Any change
to the codec, the quantiser, the packing, the config fields or the layout that alters the paper's
files fails here. What legitimately differs between releases of the same file is left out and
checked for its presence only: the library version, the base fingerprint (its algorithm is recorded
beside it) and the content checksum that covers them. The hashes pin this torch build's CPU
arithmetic (DCT as float32 matrix products); the codes absorb the last-ulp differences between
AVX2 and AVX-512 kernels on this pair.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltadct
from deltadct.format import canonical_json, read_header

#: sha256 of (tensor section, compression header) per variant, as deltadct 0.1.0 wrote them
GOLDEN = {
    "default": ("a8bcb1baf5ac43465223b82ee3f3d0772d1787f9bfe8b2422762b4fee2eb32f1",
                "f3fea96ea766bb8e59bee3fbd162adffe886c787bc4e3be71eec2d7f02539fb6"),
    "fp16_range": ("beb342d694bad7130e1249e39595ca93125f8d1d6833f7b6200e82318a2e1d4c",
                   "159e6b11f38d5b723846d032b79137a4984bf03f5c7e90a8410075cafb8d313b"),
}
#: header keys that differ between releases writing the same codes
RELEASE_KEYS = ("deltadct_version", "config_version", "base_fingerprint", "base_fingerprint_algorithm",
                "base_model", "content_sha256")
VARIANTS = {"default": {}, "fp16_range": {"range_encoding": "fp16"}}


def fixed_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base and fine-tuned weights: a square matrix, a ragged one, a conv kernel and a bias."""
    rng = np.random.default_rng(20250308)
    shapes = {"blocks.0.attn.weight": (64, 96), "blocks.0.mlp.weight": (40, 72),
              "stem.conv.weight": (32, 8, 3, 3), "blocks.0.mlp.bias": (40,)}
    base, finetuned = {}, {}
    for name, shape in shapes.items():
        b = rng.standard_normal(shape).astype(np.float32) * 0.05
        # a low-rank move plus dense noise, as fine-tuning gives
        m = shape[0]
        n = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        move = (rng.standard_normal((m, 4)) @ rng.standard_normal((4, n)) * 1e-3
                + rng.standard_normal((m, n)) * 2e-4).astype(np.float32).reshape(shape)
        base[name] = torch.from_numpy(b)
        finetuned[name] = torch.from_numpy(b + move)
    return base, finetuned


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_paper_deltadct_file_bytes_are_unchanged(variant, tmp_path):
    base, finetuned = fixed_pair()
    save_file(base, tmp_path / "base.safetensors")
    save_file(finetuned, tmp_path / "ft.safetensors")
    out = tmp_path / "ft.delta.safetensors"
    deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", method="deltadct", out=out,
                      progress=False, **VARIANTS[variant])
    tensors, header = file_digests(out)
    assert (tensors, header) == GOLDEN[variant]


def file_digests(path) -> tuple[str, str]:
    """sha256 of the safetensors index plus data section, and of the header without :data:`RELEASE_KEYS`."""
    header, offset, index = read_header(path)
    assert header["base_fingerprint"] and header["content_sha256"]
    described = {k: v for k, v in header.items() if k not in RELEASE_KEYS}
    tensors = hashlib.sha256(canonical_json(index).encode() + path.read_bytes()[offset:]).hexdigest()
    return tensors, hashlib.sha256(canonical_json(described).encode()).hexdigest()
