"""Orthonormal DCT-II as p×p matrix products, batched over all patches of a layer.

``dct2(x) = C x Cᵀ`` with ``C`` the orthonormal DCT-II matrix, so ``idct2(y) = Cᵀ y C`` is its exact
inverse. This equals ``scipy.fft.dctn(x, type=2, norm="ortho")`` over the last two axes. Matrix
products keep the transform on whatever device and batch the patches are on; no FFT is needed at
these sizes (p ≤ 64).
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    mat = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    mat[0] /= math.sqrt(2.0)
    return mat


@functools.lru_cache(maxsize=64)
def _dct_matrix_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cached per device: a fresh host→GPU copy per layer would stall the stream on every call
    return _dct_matrix_cpu(n).to(dtype=dtype, device=device)


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The n×n orthonormal DCT-II matrix ``C`` (rows are basis vectors; ``C Cᵀ = I``).

    The tensor is cached and shared between callers: treat it as read-only.
    """
    if n < 1:
        raise ValueError(f"DCT size must be positive, got {n}")
    return _dct_matrix_on(n, dtype, torch.device(device if device is not None else "cpu"))


def dct2(patches: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two axes of ``(..., p, q)``."""
    rows = dct_matrix(patches.shape[-2], dtype=patches.dtype, device=patches.device)
    cols = dct_matrix(patches.shape[-1], dtype=patches.dtype, device=patches.device)
    return rows @ patches @ cols.T


def idct2(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (2-D orthonormal DCT-III)."""
    rows = dct_matrix(coefficients.shape[-2], dtype=coefficients.dtype, device=coefficients.device)
    cols = dct_matrix(coefficients.shape[-1], dtype=coefficients.dtype, device=coefficients.device)
    return rows.T @ coefficients @ cols


def dct_rows(patches: torch.Tensor) -> torch.Tensor:
    """1-D orthonormal DCT-II along the last axis of ``(..., p, q)`` only (each patch row on its own)."""
    return patches @ dct_matrix(patches.shape[-1], dtype=patches.dtype, device=patches.device).T


def idct_rows(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_rows`."""
    return coefficients @ dct_matrix(coefficients.shape[-1], dtype=coefficients.dtype, device=coefficients.device)
