"""Uncertainty of scores over fine-tune seeds and evaluation examples, and paired tests between methods.

Pure numpy/scipy. A score here is a metric computed over one evaluation set (accuracy, Matthews
correlation, Pearson/Spearman, a mean KL …); a method is scored on several *seed groups* (the
deltas of one zoo seed each), every group on the same or its own examples.

- :func:`t_interval`: the 95 % Student-t interval of a mean over seeds.
- :func:`bootstrap_se`: the standard error of the seed-mean score from resampling examples.
- :func:`mean_ci`: both combined, ``half = sqrt((t·s/√S)² + (z·se_boot)²)``: the spread over deltas
  and the finite evaluation set are independent sources of error, so their variances add.
- :func:`paired_bootstrap`: two-sided p-value of the difference between two methods scored on the
  same seeds and examples, resampling seeds and examples together (the same draws for both methods).
- :func:`mcnemar_exact`: the exact (binomial) McNemar test on paired correct/wrong outcomes.

Outputs of one group are a tuple of equally long arrays (e.g. ``(labels, predictions)``) handed to
``metric(*arrays)``; ``metric=None`` means the score is the mean of the last array (e.g. ``(labels,
correct)`` or ``(kl,)``), which resamples in one vectorised gather. Whether the groups share their
examples is told by ``shared`` or, when None, read off the first arrays (equal labels = same examples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _scipy_stats

Outputs = tuple[np.ndarray, ...]  # per-example arrays of one evaluation, all of one length
Metric = Callable[..., float] | None

#: bootstrap replicates used when not told otherwise (Monte-Carlo error of a 0.05 p-value ≈ 0.005)
DEFAULT_RESAMPLES = 2000


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half_width)`` of the Student-t interval ``mean ± t_{S−1} · s / √S``; half width 0 for a
    single value (no spread can be estimated from one seed)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(values.mean())
    if values.size < 2:
        return mean, 0.0
    t = _scipy_stats.t.ppf(0.5 + confidence / 2, df=values.size - 1)
    return mean, float(t * values.std(ddof=1) / np.sqrt(values.size))


def _as_groups(groups: Sequence[Outputs | np.ndarray]) -> list[Outputs]:
    out = []
    for group in groups:
        arrays = (group,) if isinstance(group, np.ndarray) else tuple(group)
        arrays = tuple(np.asarray(a) for a in arrays)
        if not arrays or len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
            raise ValueError("each group needs one or more non-empty per-example arrays of one length")
        out.append(arrays)
    if not out:
        raise ValueError("no groups to score")
    return out


def shared_examples(groups: Sequence[Outputs]) -> bool:
    """Whether every group was evaluated on the same examples (same length and same first array, the
    labels): then an example resample must be drawn once for all of them."""
    first = groups[0][0]
    return all(len(g[0]) == len(first) and np.array_equal(g[0], first) for g in groups[1:])


def _score(arrays: Outputs, metric: Metric) -> float:
    return float(np.mean(arrays[-1])) if metric is None else float(metric(*arrays))


def resampled_scores(groups: Sequence[Outputs], metric: Metric, indices: Sequence[np.ndarray]) -> np.ndarray:
    """``(B, G)``: the metric of group ``g`` on example resample ``b``; ``indices[g]`` is that group's
    ``(B, n_g)`` index array (the same array object for groups that share their examples)."""
    columns = []
    for arrays, idx in zip(groups, indices, strict=True):
        if metric is None:  # a mean: one gather for all replicates
            columns.append(np.asarray(arrays[-1], dtype=np.float64)[idx].mean(axis=1))
        else:
            columns.append(np.array([_score(tuple(a[row] for a in arrays), metric) for row in idx]))
    return np.stack(columns, axis=1)


def example_indices(groups: Sequence[Outputs], n_resamples: int, rng: np.random.Generator,
                    shared: bool | None = None) -> list[np.ndarray]:
    """Bootstrap example indices for each group: one draw shared by all groups when they share their
    examples (``shared``; None: :func:`shared_examples`), else an independent draw per group."""
    if shared is None:
        shared = shared_examples(groups)
    if shared:
        if len({len(g[0]) for g in groups}) != 1:
            raise ValueError("groups said to share their examples differ in length")
        n = len(groups[0][0])
        draw = rng.integers(0, n, size=(n_resamples, n))
        return [draw] * len(groups)
    return [rng.integers(0, len(g[0]), size=(n_resamples, len(g[0]))) for g in groups]


def _checked_tasks(tasks: Sequence[tuple]) -> list[tuple[list[Outputs], Metric, bool | None]]:
    """``(groups, metric[, shared])`` per task, checked; ``shared`` defaults to None (detect)."""
    checked = [(_as_groups(task[0]), task[1], task[2] if len(task) > 2 else None) for task in tasks]
    if not checked:
        raise ValueError("no tasks to score")
    if len({len(groups) for groups, _, _ in checked}) != 1:
        raise ValueError("every task needs the same seed groups (one per seed, in the same order)")
    return checked


def _observed(tasks: list[tuple[list[Outputs], Metric, bool | None]]) -> np.ndarray:
    """``(G,)``: each group's score averaged over the tasks."""
    return np.mean([[_score(g, metric) for g in groups] for groups, metric, _ in tasks], axis=0)


def _replicates(tasks: list[tuple[list[Outputs], Metric, bool | None]], n_resamples: int, rng: np.random.Generator,
                indices: list[list[np.ndarray]] | None = None) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """``(B, G)`` task-averaged scores on example resamples (each task's examples drawn on their own)
    and the draws used, so a paired partner can be scored on the very same ones."""
    if indices is None:
        indices = [example_indices(groups, n_resamples, rng, shared) for groups, _, shared in tasks]
    scores = np.mean([resampled_scores(groups, metric, idx)
                      for (groups, metric, _), idx in zip(tasks, indices, strict=True)], axis=0)
    return scores, indices


def bootstrap_se(groups: Sequence[Outputs | np.ndarray], metric: Metric = None, *, shared: bool | None = None,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> float:
    """Standard error of the mean over groups of their score, from resampling examples only."""
    replicates, _ = _replicates(_checked_tasks([(groups, metric, shared)]), n_resamples, np.random.default_rng(seed))
    return float(replicates.mean(axis=1).std(ddof=1))


@dataclass(frozen=True)
class Interval:
    """A mean over seed groups with its 95 % half width and the two parts it combines."""

    mean: float
    half_width: float
    seed_half_width: float  # Student-t over the groups' scores (0 with one group)
    example_half_width: float  # normal quantile × bootstrap standard error over examples
    num_groups: int


def mean_ci(groups: Sequence[Outputs | np.ndarray], metric: Metric = None, *, shared: bool | None = None,
            confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """The mean over seed groups of their score with a ``confidence`` interval that combines the
    Student-t interval over groups and the bootstrap over examples (see the module docstring)."""
    return mean_ci_over_tasks([(groups, metric, shared)], confidence=confidence, n_resamples=n_resamples, seed=seed)


def mean_ci_over_tasks(tasks: Sequence[tuple], *, confidence: float = 0.95,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """:func:`mean_ci` of the average over tasks: ``tasks`` holds ``(groups, metric[, shared])`` per
    task, the groups of every task in the same seed order; seed ``g``'s score is its average over the
    tasks, and each task's examples are resampled on their own."""
    tasks = _checked_tasks(tasks)
    mean, seed_half = t_interval(_observed(tasks), confidence)
    replicates, _ = _replicates(tasks, n_resamples, np.random.default_rng(seed))
    z = _scipy_stats.norm.ppf(0.5 + confidence / 2)
    example_half = float(z * replicates.mean(axis=1).std(ddof=1))
    return Interval(mean, float(np.hypot(seed_half, example_half)), seed_half, example_half, len(tasks[0][0]))


@dataclass(frozen=True)
class PairedTest:
    """``difference`` = mean score of A − mean score of B, with its two-sided bootstrap p-value."""

    difference: float
    p_value: float
    num_groups: int
    n_resamples: int


def paired_bootstrap(a: Sequence[Outputs | np.ndarray], b: Sequence[Outputs | np.ndarray], metric: Metric = None,
                     *, shared: bool | None = None, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedTest:
    """Paired bootstrap test of two methods scored on the same seed groups (``a[g]`` and ``b[g]`` are
    the same delta's seed and the same examples, e.g. ``(labels, predictions)`` with equal labels).

    Each replicate draws the groups with replacement (when there are several) and the examples with
    replacement, the same draws for both methods, and takes the difference of the mean scores. The
    replicates, centred on the observed difference d, stand for the null distribution; the p-value is
    ``(1 + #{|d* − d| ≥ |d|}) / (1 + B)`` (two-sided; never 0).
    """
    return paired_bootstrap_over_tasks([(a, b, metric, shared)], n_resamples=n_resamples, seed=seed)


def paired_bootstrap_over_tasks(tasks: Sequence[tuple], *, n_resamples: int = DEFAULT_RESAMPLES,
                                seed: int = 0) -> PairedTest:
    """:func:`paired_bootstrap` of the average over tasks; ``tasks`` holds ``(a_groups, b_groups,
    metric[, shared])`` (``shared``: whether a task's seed groups share their examples; None: detect)."""
    tasks_a = _checked_tasks([(t[0], t[2], t[3] if len(t) > 3 else None) for t in tasks])
    tasks_b = _checked_tasks([(t[1], t[2], t[3] if len(t) > 3 else None) for t in tasks])
    if len(tasks_a[0][0]) != len(tasks_b[0][0]):
        raise ValueError(f"paired groups differ in number: {len(tasks_a[0][0])} vs {len(tasks_b[0][0])}")
    for (groups_a, _, _), (groups_b, _, _) in zip(tasks_a, tasks_b, strict=True):
        for i, (ga, gb) in enumerate(zip(groups_a, groups_b, strict=True)):
            if len(ga[0]) != len(gb[0]) or (len(ga) > 1 and not np.array_equal(ga[0], gb[0])):
                raise ValueError(f"group {i}: the two methods were not scored on the same examples")
    rng = np.random.default_rng(seed)
    scores_a, indices = _replicates(tasks_a, n_resamples, rng)
    scores_b, _ = _replicates(tasks_b, n_resamples, rng, indices)
    per_group = scores_a - scores_b  # (B, G)
    num_groups = per_group.shape[1]
    if num_groups > 1:
        pick = rng.integers(0, num_groups, size=(n_resamples, num_groups))
        replicates = np.take_along_axis(per_group, pick, axis=1).mean(axis=1)
    else:
        replicates = per_group[:, 0]
    observed = float(np.mean(_observed(tasks_a) - _observed(tasks_b)))
    extreme = int(np.sum(np.abs(replicates - observed) >= abs(observed)))
    return PairedTest(observed, (1 + extreme) / (1 + n_resamples), num_groups, n_resamples)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` pairs where only A is right and ``c`` where only B is:
    ``min(1, 2 · P(X ≤ min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``; 1 when there is no discordant pair."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * _scipy_stats.binom.cdf(min(b, c), n, 0.5)))


def mcnemar_counts(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int]:
    """``(b, c)``: examples only A gets right, examples only B gets right."""
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    return int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))


def significance_mark(p_value: float | None) -> str:
    """``**`` for p < 0.01, ``*`` for p < 0.05, else nothing."""
    if p_value is None:
        return ""
    return "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""
