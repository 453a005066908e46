"""eval.stats against hand-computed values and closed forms (Student-t table, the bootstrap variance
of a mean, the binomial law of a bootstrap of discordant pairs, scipy's exact binomial test)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from eval.metrics import matthews_correlation
from eval.stats import (
    bootstrap_se, mcnemar_counts, mcnemar_exact, mean_ci, mean_ci_over_tasks, paired_bootstrap,
    paired_bootstrap_over_tasks, significance_mark, t_interval,
)


def test_t_interval_of_three_seeds_by_hand():
    # mean 2, sample sd 1, t(0.975, df=2) = 4.302653 (t table) -> half width 4.302653 / sqrt(3)
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    assert t_interval([0.7]) == (0.7, 0.0)  # one seed: no spread to estimate


def test_bootstrap_se_of_a_mean_is_the_plug_in_formula():
    # resampling n values with replacement: Var(mean*) = (1/n) · (1/n) Σ (x − x̄)²
    x = np.array([0, 0, 1, 1, 1], dtype=float)  # mean 0.6, plug-in variance 0.24
    assert bootstrap_se([x], n_resamples=40000, seed=1) == pytest.approx(np.sqrt(0.24 / 5), rel=0.02)
    # two examples [0, 1]: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> sd sqrt(1/8)
    assert bootstrap_se([np.array([0.0, 1.0])], n_resamples=40000, seed=2) == pytest.approx(np.sqrt(1 / 8), rel=0.02)


def test_seeds_on_the_same_examples_share_their_resamples():
    x = np.array([0, 0, 1, 1, 1], dtype=float)
    one = bootstrap_se([x], n_resamples=20000, seed=3)
    # the same examples under two seeds: the example noise is common to both, it does not average out
    assert bootstrap_se([x, x.copy()], n_resamples=20000, seed=3) == pytest.approx(one, rel=1e-12)
    # disjoint example sets (other lengths) are drawn independently: the seed mean's SE shrinks by √2
    y = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=float)  # 10 examples, variance 0.24 again
    independent = bootstrap_se([x, y], n_resamples=40000, seed=4)
    assert independent == pytest.approx(0.5 * np.sqrt(0.24 / 5 + 0.24 / 10), rel=0.03)


def test_mean_ci_combines_seed_and_example_parts_in_quadrature():
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0])
    runs = [np.array([0, 1, 1, 0, 1, 0, 0, 1, 0, 1]), np.array([0, 1, 0, 0, 1, 0, 1, 1, 0, 0]),
            np.array([1, 1, 1, 0, 1, 0, 1, 1, 1, 0])]
    correct = [(p == labels).astype(float) for p in runs]  # accuracies 0.8, 0.9, 0.8
    interval = mean_ci(correct, n_resamples=20000, seed=5)
    assert interval.mean == pytest.approx(2.5 / 3)
    assert interval.seed_half_width == pytest.approx(t_interval([0.8, 0.9, 0.8])[1])
    se = bootstrap_se(correct, n_resamples=20000, seed=5)
    assert interval.example_half_width == pytest.approx(1.959964 * se, rel=1e-6)
    assert interval.half_width == pytest.approx(np.hypot(interval.seed_half_width, interval.example_half_width))
    # a metric over (labels, predictions): the mean is the metric's own value per seed, averaged
    mcc = mean_ci([(labels, p) for p in runs], matthews_correlation, n_resamples=500)
    assert mcc.mean == pytest.approx(np.mean([matthews_correlation(labels, p) for p in runs]))
    # averaging two tasks: the per-seed average is what the t part sees
    both = mean_ci_over_tasks([(correct, None), ([(labels, p) for p in runs], matthews_correlation)], n_resamples=500)
    per_seed = [(c.mean() + matthews_correlation(labels, p)) / 2 for c, p in zip(correct, runs, strict=True)]
    assert both.mean == pytest.approx(np.mean(per_seed))
    assert both.seed_half_width == pytest.approx(t_interval(per_seed)[1])


def test_mcnemar_exact_known_value():
    # b = 8, c = 2: 2 · P(X ≤ 2), X ~ Bin(10, 1/2) = 2 · (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(0.109375, abs=1e-12)
    assert mcnemar_exact(8, 2) == pytest.approx(binomtest(2, 10, 0.5).pvalue, abs=1e-12)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    a = np.array([1] * 8 + [0] * 2 + [1] * 5, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5, dtype=bool)
    assert mcnemar_counts(a, b) == (8, 2)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_p_value_matches_its_binomial_law():
    # 10 discordant examples, A alone right on 8: a resample holds k ~ Bin(10, 0.8) of those 8, its
    # difference is (2k − 10)/10, and |d* − 0.6| ≥ 0.6 exactly when k ≤ 5: p = P(Bin(10, 0.8) ≤ 5)
    a = np.array([1] * 8 + [0] * 2, dtype=float)
    b = np.array([0] * 8 + [1] * 2, dtype=float)
    test = paired_bootstrap([a], [b], n_resamples=20000, seed=6)
    assert test.difference == pytest.approx(0.6)
    assert test.p_value == pytest.approx(binom.cdf(5, 10, 0.8), abs=0.006)  # 0.0328
    # three seeds with the same outcomes: resampling seeds changes nothing
    three = paired_bootstrap([a, a, a], [b, b, b], n_resamples=20000, seed=6)
    assert three.p_value == pytest.approx(test.p_value, abs=0.006) and three.num_groups == 3
    # identical methods: difference 0, p = 1
    assert paired_bootstrap([a], [a.copy()], n_resamples=200).p_value == 1.0
    # the same over-tasks engine with one task
    assert paired_bootstrap_over_tasks([([a], [b], None)], n_resamples=20000, seed=6).p_value == test.p_value


def test_paired_bootstrap_refuses_different_examples():
    labels = np.array([0, 1, 1, 1])
    with pytest.raises(ValueError, match="not scored on the same examples"):
        paired_bootstrap([(labels, labels)], [(labels[::-1], labels)], matthews_correlation)
    with pytest.raises(ValueError, match="differ in number"):
        paired_bootstrap([labels, labels], [labels])


def test_significance_marks():
    assert [significance_mark(p) for p in (0.001, 0.03, 0.2, None)] == ["**", "*", "", ""]
