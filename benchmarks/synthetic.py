"""Synthetic fine-tuning deltas shaped like RoBERTa-base, shared by the core benchmarks and tests.

Real fine-tuning deltas are heavy-tailed and carry low-rank structure (a few directions move a lot,
the rest is noise). This builds each delta as a rank-8 product plus Student-t (3 degrees of
freedom) noise, about 1e-3 in scale, from a seeded generator so every run sees the same numbers.
"""
from __future__ import annotations

import math

import torch

HIDDEN, INTERMEDIATE, LAYERS = 768, 3072, 12


def roberta_base_shapes(layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    """Names and shapes of RoBERTa-base's compressible matrices (attention q/k/v/o and the MLP)."""
    shapes = {}
    for i in range(layers):
        prefix = f"roberta.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            shapes[f"{prefix}.attention.self.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{prefix}.attention.output.dense.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{prefix}.intermediate.dense.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{prefix}.output.dense.weight"] = (HIDDEN, INTERMEDIATE)
    return shapes


def heavy_tailed_delta(shape: tuple[int, int], generator: torch.Generator, *, rank: int = 8,
                       scale: float = 1e-3, dof: int = 3) -> torch.Tensor:
    """A rank-``rank`` component plus Student-t noise, fp32, with entries of about ``scale``."""
    m, n = shape
    low_rank = torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator)
    low_rank /= math.sqrt(rank)
    # Student-t = normal / sqrt(chi²_dof / dof), chi² as a sum of squared normals
    chi2 = torch.randn(dof, m, n, generator=generator).square().sum(dim=0)
    noise = torch.randn(m, n, generator=generator) / torch.sqrt(chi2 / dof)
    return (scale * (0.5 * low_rank + noise)).float()


def roberta_base_deltas(layers: int = LAYERS, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: heavy_tailed_delta(shape, gen) for name, shape in roberta_base_shapes(layers).items()}
