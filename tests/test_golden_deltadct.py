"""The paper's ``deltadct`` writes exactly the bytes it always wrote for its default settings.

A fixed small pair (drawn from numpy's seeded PCG64, so it does not depend on torch's RNG) is
compressed with the default config and with the paper's fp16 min/max side information, and the
sha256 of each written file is compared with the committed value. Any change to the codec, the
quantiser, the packing, the config fields or the file layout that alters the paper's files fails
here. The hashes pin this torch build's CPU arithmetic (DCT as float32 matrix products).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltadct

#: sha256 of the compressed file per variant (method options beyond the defaults)
GOLDEN = {
    "default": "9db5be501baaa680cd27cb342ccfcddb15032882b9be1b1ad287f13b1948758b",
    "fp16_range": "20040bb01da1b9ab9f23aab9238163f7a042e5a2fc9279a6b0ea26f7f6d6e7cc",
}
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
    assert hashlib.sha256(out.read_bytes()).hexdigest() == GOLDEN[variant]
