"""Split a matrix into p×p patches and score them.

Edge handling: a matrix whose sides are not multiples of ``p`` is zero-padded at the bottom and
right to the next multiple; :func:`unpatchify` crops the padding away again. The padding takes part
in the patch's transform and quantisation (it is part of the p×p block), but never in importance
scores (zeros add nothing to L1/L2/max) nor in any layer statistic, which are taken on the
unpadded matrix.
"""
from __future__ import annotations

import torch

IMPORTANCE_METRICS = ("l2", "l1", "max")


def patch_grid(shape: tuple[int, int], p: int) -> tuple[int, int]:
    """Number of patch rows and columns covering an (m, n) matrix."""
    m, n = shape
    return -(-m // p), -(-n // p)


def patchify(matrix: torch.Tensor, p: int) -> torch.Tensor:
    """(m, n) → (N, p, p) in row-major patch order, zero-padding ragged edges."""
    m, n = matrix.shape
    gr, gc = patch_grid((m, n), p)
    if gr * p != m or gc * p != n:
        matrix = torch.nn.functional.pad(matrix, (0, gc * p - n, 0, gr * p - m))
    return matrix.reshape(gr, p, gc, p).transpose(1, 2).reshape(gr * gc, p, p)


def unpatchify(patches: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, p, p) → (m, n), inverse of :func:`patchify` (crops the padding)."""
    p = patches.shape[-1]
    m, n = shape
    gr, gc = patch_grid((m, n), p)
    full = patches.reshape(gr, gc, p, p).transpose(1, 2).reshape(gr * p, gc * p)
    return full[:m, :n]


def importance(patches: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """One score per patch: L2 norm (the paper's), L1 norm, or max |value|."""
    flat = patches.reshape(patches.shape[0], -1)
    if metric == "l2":
        return torch.linalg.vector_norm(flat, ord=2, dim=1)
    if metric == "l1":
        return flat.abs().sum(dim=1)
    if metric == "max":
        return flat.abs().amax(dim=1)
    raise ValueError(f"unknown importance metric {metric!r}; choose from {IMPORTANCE_METRICS}")


def allocation_counts(num_patches: int, ratios: tuple[float, ...]) -> list[int]:
    """Patch counts per bit class for ``ratios`` (highest class first), summing to ``num_patches``.

    Cumulative shares are rounded *down*: the top ``k`` classes together get ``floor((r_0+…+r_k)·N)``
    patches. Each count is then within one of ``r·N``, and since widths fall class by class, the
    layer never spends more bits than the ratios do (plain per-class rounding can: N=7 at
    (0.2, 0.6, 0.2) would give 2/4/1 patches, 8 bits for 7 patches at a 1-bit budget).
    """
    # the epsilon keeps float noise in the ratios (0.29·100 = 28.999…) from losing a patch
    cumulative, total = [], 0.0
    for r in ratios[:-1]:
        total += r
        cumulative.append(min(num_patches, int(total * num_patches + 1e-9)))
    bounds = [0, *cumulative, num_patches]
    return [bounds[i + 1] - bounds[i] for i in range(len(ratios))]


def allocate(scores: torch.Tensor, counts: list[int], bit_classes: tuple[int, ...]) -> torch.Tensor:
    """Bit width per patch: the ``counts[0]`` highest scores get ``bit_classes[0]`` bits, and so on.

    Sorting is stable (ties keep patch order) so the same scores always give the same allocation.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    # filled on the device from host ints: a host->device copy or a tensor-count repeat_interleave
    # would each stall a CUDA stream once per layer
    ranked_bits = torch.cat([torch.full((c,), b, dtype=torch.uint8, device=scores.device)
                             for b, c in zip(bit_classes, counts, strict=True)])
    bits = torch.empty_like(ranked_bits)
    bits[order] = ranked_bits
    return bits
