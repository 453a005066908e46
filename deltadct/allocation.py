"""Rate–distortion bit allocation as pure, batched tensor functions (no Python loop over patches).

Each patch ``i`` can be stored at a width ``w`` in ``0..W`` for a rate ``R[w]`` bits (codes plus its
share of side information) and then has a squared reconstruction error ``D[i, w]``. Allocation picks
one width per patch to minimise ``Σ D[i, w_i]`` subject to ``Σ R[w_i] ≤ budget``.

The solver works on each patch's *lower convex hull* of (rate, distortion) points: on the hull the
error saved per extra bit falls with every step up, so taking hull steps of all patches in order of
that slope (the greedy marginal-gain rule) visits exactly the Lagrangian optima of the problem, and
the longest prefix that fits the budget is optimal up to the one step that did not fit. Widths off
the hull (e.g. 3 bits when 4 bits saves more per bit) are never chosen.
"""
from __future__ import annotations

import torch

from . import codec


def distortion_table(rows: torch.Tensor, max_width: int, *, range_encoding: str, range_bits: int) -> torch.Tensor:
    """Squared error of every row (patch) quantised at every width, shape (N, max_width + 1).

    Column 0 is dropping the patch (error = its squared norm). Column ``b`` quantises every row at
    ``b`` bits with the codec's own quantiser and range encoding, so it is the error the file will
    have. With an orthonormal DCT the coefficient-domain error equals the spatial-domain error.
    """
    table = torch.empty(rows.shape[0], max_width + 1, dtype=torch.float32, device=rows.device)
    table[:, 0] = rows.float().pow(2).sum(dim=1)
    for width in range(1, max_width + 1):
        widths = torch.full((rows.shape[0],), width, dtype=torch.uint8, device=rows.device)
        _, dequant = codec.quantize_rows(rows, widths, range_encoding=range_encoding, range_bits=range_bits,
                                         max_width=max_width)
        table[:, width] = (rows - dequant).float().pow(2).sum(dim=1)
    return table


def hull_steps(distortion: torch.Tensor, rates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The steps along each row's lower convex R-D hull, starting from width 0.

    ``distortion`` is (N, W+1), ``rates`` (W+1,) increasing with width, ``rates[0]`` the cost of
    a dropped patch. Returns ``(slope, step_from, step_to)``, each (N, W): step ``k`` of patch ``i``
    goes from width ``step_from`` to ``step_to`` and saves ``slope`` error per bit. Slopes fall
    along a row (convexity); unused step slots, and steps that save nothing, have slope ``-inf``.
    """
    n, num_widths = distortion.shape
    rates = rates.to(distortion.device, torch.float64)
    widths = torch.arange(num_widths, device=distortion.device)
    current = torch.zeros(n, dtype=torch.long, device=distortion.device)
    slope = torch.full((n, num_widths - 1), -torch.inf, dtype=torch.float64, device=distortion.device)
    step_from = torch.zeros((n, num_widths - 1), dtype=torch.uint8, device=distortion.device)
    step_to = torch.zeros_like(step_from)
    d = distortion.double()
    for k in range(num_widths - 1):
        d_now = d.gather(1, current.unsqueeze(1))
        gain = (d_now - d) / (rates - rates[current].unsqueeze(1)).clamp(min=1e-12)
        gain = torch.where(widths > current.unsqueeze(1), gain, torch.full_like(gain, -torch.inf))
        # the steepest descent from the current vertex is the next hull vertex; ties go to the wider step
        best_gain = gain.amax(dim=1, keepdim=True)
        nxt = torch.where(gain == best_gain, widths, torch.full_like(widths, -1)).amax(dim=1)
        useful = (best_gain.squeeze(1) > 0) & (nxt > current)
        slope[:, k] = torch.where(useful, best_gain.squeeze(1), slope[:, k])
        step_from[:, k] = current.to(torch.uint8)
        step_to[:, k] = torch.where(useful, nxt, current).to(torch.uint8)
        current = torch.where(useful, nxt, current)
    return slope, step_from, step_to


def allocate_greedy(slope: torch.Tensor, step_cost: torch.Tensor, step_to: torch.Tensor,
                    budget_bits: float) -> torch.Tensor:
    """Width per patch from the steps with the best error saved per bit that fit ``budget_bits``.

    ``slope``/``step_cost``/``step_to`` are (N, K) from :func:`hull_steps` (``step_cost`` in bits).
    Steps are taken in order of falling slope (ties: patch order, then step order, so the result is
    deterministic) while their cumulative cost stays within the budget; the budget left over is less
    than the cost of one step. Returns uint8 widths (N,).
    """
    n, k = slope.shape
    flat_slope = slope.reshape(-1)
    valid = torch.isfinite(flat_slope)
    order = torch.nonzero(valid).squeeze(1)
    order = order[torch.sort(flat_slope[order], descending=True, stable=True).indices]
    cost = step_cost.reshape(-1).double()[order]
    taken_sorted = cost.cumsum(0) <= budget_bits
    taken = torch.zeros(n * k, dtype=torch.bool, device=slope.device)
    taken[order[taken_sorted]] = True
    taken = taken.reshape(n, k)
    # the prefix is closed per patch: slopes fall along a row, so a taken step's predecessors were taken
    last = torch.where(taken, torch.arange(k, device=slope.device), torch.full_like(step_to, -1, dtype=torch.long))
    last = last.amax(dim=1)
    widths = torch.where(last >= 0, step_to.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1),
                         torch.zeros(n, dtype=torch.uint8, device=slope.device))
    return widths.to(torch.uint8)
