"""GLUE's official metrics, computed from their definitions (no hub download).

HF ``evaluate.load("glue", task)`` fetches its metric script from the hub, which is unreachable
offline, so the same formulas are computed here with numpy/scipy; tests check them against
scikit-learn and scipy on fixed predictions. Predictions outside the label set (e.g. a T5
generation that maps to no label, encoded as -1) count as wrong.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata

ArrayLike = Sequence[float] | np.ndarray


def accuracy(labels: ArrayLike, predictions: ArrayLike) -> float:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return float(np.mean(labels == predictions)) if labels.size else float("nan")


def f1_binary(labels: ArrayLike, predictions: ArrayLike, positive: int = 1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN); 0 when there is no positive at all."""
    labels, predictions = np.asarray(labels) == positive, np.asarray(predictions) == positive
    tp = np.sum(labels & predictions)
    denominator = 2 * tp + np.sum(~labels & predictions) + np.sum(labels & ~predictions)
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_correlation(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004) over the union of observed classes.

    ``(c·s − Σ_k p_k·t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))`` with c correct, s samples, p_k / t_k the
    predicted / true counts of class k; 0 when either side has a single class (undefined).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes = np.union1d(labels, predictions)
    t = np.array([np.sum(labels == k) for k in classes], dtype=np.float64)
    p = np.array([np.sum(predictions == k) for k in classes], dtype=np.float64)
    s, c = float(labels.size), float(np.sum(labels == predictions))
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denominator) if denominator else 0.0


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else float("nan")


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    return pearson(rankdata(x), rankdata(y))


def glue_metrics(task: str, labels: ArrayLike, predictions: ArrayLike) -> dict[str, float]:
    """The metrics GLUE reports for ``task``, plus ``score``: the GLUE leaderboard's per-task number
    (Matthews for CoLA, mean of F1 and accuracy for MRPC/QQP, mean of Pearson and Spearman for STS-B,
    accuracy otherwise)."""
    if task == "cola":
        out = {"matthews_correlation": matthews_correlation(labels, predictions)}
        out["score"] = out["matthews_correlation"]
    elif task == "stsb":
        out = {"pearson": pearson(predictions, labels), "spearmanr": spearman(predictions, labels)}
        out["score"] = (out["pearson"] + out["spearmanr"]) / 2
    elif task in ("mrpc", "qqp"):
        out = {"accuracy": accuracy(labels, predictions), "f1": f1_binary(labels, predictions)}
        out["score"] = (out["accuracy"] + out["f1"]) / 2
    else:
        out = {"accuracy": accuracy(labels, predictions)}
        out["score"] = out["accuracy"]
    return out
