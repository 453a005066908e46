"""The zoo's GLUE data: the offline QNLI / MNLI re-splits, STS-B's regression score against scipy,
the majority-class bar and the learned mark."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from experiments.zoo.common import LEARNED_MARGIN, is_learned
from experiments.zoo.glue import GLUE_TASKS, QNLI_EVAL_SIZE, finetune_splits, load_glue, majority_score, score


def test_mnli_trains_on_matched_and_evaluates_on_mismatched():
    train, evaluation = finetune_splits("mnli")
    assert len(train) == 9815 and len(evaluation) == 9832  # the two validation files, header excluded
    assert not {ex["texts"] for ex in train} & {ex["texts"] for ex in evaluation}
    assert {ex["label"] for ex in evaluation} == {0, 1, 2}


def test_qnli_split_is_disjoint_fixed_and_complete():
    train, evaluation = finetune_splits("qnli")
    assert len(evaluation) == QNLI_EVAL_SIZE and len(train) + len(evaluation) == len(load_glue("qnli", "validation"))
    assert not {ex["texts"] for ex in train} & {ex["texts"] for ex in evaluation}
    assert finetune_splits("qnli")[1] == evaluation  # the same split every time (every zoo seed)


def test_stsb_score_against_scipy_on_its_validation_set():
    _, evaluation = finetune_splits("stsb")
    assert GLUE_TASKS["stsb"].is_regression
    labels = np.array([ex["label"] for ex in evaluation])
    assert labels.dtype == np.float64 and labels.min() == 0.0 and labels.max() == 5.0
    predictions = labels + np.random.default_rng(0).normal(0, 1.5, len(labels))
    expected = (pearsonr(predictions, labels)[0] + spearmanr(predictions, labels)[0]) / 2
    assert score("pearson_spearman", labels.tolist(), predictions.tolist()) == pytest.approx(expected, abs=1e-12)
    assert majority_score("pearson_spearman", labels.tolist()) == 0.0  # a constant has no correlation


def test_majority_bar_and_learned_mark():
    labels = [1, 1, 1, 0]
    assert majority_score("accuracy", labels) == 0.75
    assert majority_score("matthews_correlation", labels) == 0.0
    assert majority_score("accuracy_f1", labels) == pytest.approx((0.75 + 6 / 7) / 2)  # F1 = 2·3 / (2·3 + 1)
    assert is_learned(0.80, 0.50, 0.75) and not is_learned(0.77, 0.50, 0.75)  # within the 3-point margin
    assert not is_learned(0.60, 0.60 - LEARNED_MARGIN / 2, None)
