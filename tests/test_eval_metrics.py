"""GLUE metric functions against scikit-learn / scipy on fixed hand-made predictions."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from eval.metrics import accuracy, f1_binary, glue_metrics, matthews_correlation, pearson, spearman

LABELS = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
PREDS = np.array([0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1])


def test_binary_metrics_match_sklearn():
    assert accuracy(LABELS, PREDS) == pytest.approx(accuracy_score(LABELS, PREDS), abs=1e-15)
    assert f1_binary(LABELS, PREDS) == pytest.approx(f1_score(LABELS, PREDS), abs=1e-15)
    assert matthews_correlation(LABELS, PREDS) == pytest.approx(matthews_corrcoef(LABELS, PREDS), abs=1e-12)


def test_hand_computed_values():
    # TP=5 FP=2 FN=2 TN=3 -> acc 8/12, F1 10/14, MCC (15-4)/sqrt(7*7*5*5)
    assert accuracy(LABELS, PREDS) == pytest.approx(8 / 12)
    assert f1_binary(LABELS, PREDS) == pytest.approx(10 / 14)
    assert matthews_correlation(LABELS, PREDS) == pytest.approx(11 / 35)


def test_multiclass_and_unmapped_predictions_match_sklearn():
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 0])
    preds = np.array([0, 2, 2, -1, 1, 0, 1, 1, -1, 0])  # -1: a generation that maps to no label
    assert matthews_correlation(labels, preds) == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)
    assert accuracy(labels, preds) == pytest.approx(accuracy_score(labels, preds))


def test_degenerate_mcc_is_zero_like_sklearn():
    labels, preds = np.array([0, 1, 0, 1]), np.zeros(4, dtype=int)
    assert matthews_correlation(labels, preds) == matthews_corrcoef(labels, preds) == 0.0


def test_correlations_match_scipy_with_ties():
    x = np.array([0.2, 1.5, 1.5, 3.0, 4.8, 2.2, 0.0, 5.0, 2.2])
    y = np.array([0.0, 1.0, 2.0, 2.5, 5.0, 2.0, 0.5, 4.0, 3.0])
    assert pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


@pytest.mark.parametrize("task,keys", [("cola", {"matthews_correlation"}), ("sst2", {"accuracy"}),
                                       ("mrpc", {"accuracy", "f1"}), ("qqp", {"accuracy", "f1"}),
                                       ("mnli", {"accuracy"}), ("qnli", {"accuracy"}), ("rte", {"accuracy"})])
def test_glue_headline(task, keys):
    out = glue_metrics(task, LABELS, PREDS)
    assert set(out) == keys | {"score"}
    assert out["score"] == pytest.approx(np.mean([out[k] for k in keys]))


def test_stsb_headline_is_mean_of_correlations():
    labels, preds = np.array([0.0, 1.2, 3.4, 5.0, 2.5]), np.array([0.5, 1.0, 3.9, 4.1, 2.0])
    out = glue_metrics("stsb", labels, preds)
    assert out["pearson"] == pytest.approx(pearsonr(preds, labels)[0])
    assert out["score"] == pytest.approx((pearsonr(preds, labels)[0] + spearmanr(preds, labels)[0]) / 2)
