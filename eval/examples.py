"""Per-example outputs of an evaluation, in the compact JSON form result records store.

An evaluator that scores examples one by one keeps its outputs in ``Evaluator.last_examples``
(``encode_examples("glue:sst2", labels=…, predictions=…)``); the runner stores them in the record under
``examples.<evaluator>``, so tables can run paired tests (the same examples under two methods) and
bootstrap over examples from the result store alone. Small integers (class ids, -1 for an answer
outside the label set) become one character each (``"0110-2"``); anything else a list of floats
rounded to 6 significant digits. ``index`` (present when a subset was evaluated) holds the example
positions in the full split.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import numpy as np

from . import metrics

_DIGITS = "-0123456789"  # character i stands for the integer i - 1
_VALUE_OF_BYTE = np.zeros(256, dtype=np.int64)
_VALUE_OF_BYTE[[ord(c) for c in _DIGITS]] = np.arange(len(_DIGITS)) - 1


def _encode(values: Any) -> str | list[float]:
    array = np.asarray(values)
    if array.dtype == bool:
        array = array.astype(np.int64)
    if array.size and np.issubdtype(array.dtype, np.number) and np.all(np.mod(array, 1) == 0) \
            and array.min() >= -1 and array.max() <= 9:
        return "".join(_DIGITS[int(v) + 1] for v in array.tolist())
    return [float(f"{float(v):.6g}") for v in array.tolist()]


def _decode(value: str | list) -> np.ndarray:
    if isinstance(value, str):
        return _VALUE_OF_BYTE[np.frombuffer(value.encode("ascii"), dtype=np.uint8)]
    return np.asarray(value, dtype=np.float64)


def encode_examples(scorer: str, **columns: Any) -> dict[str, Any]:
    """``{"scorer": scorer, "columns": {name: compact values}}`` for per-example columns of one length
    (None columns are left out); ``scorer`` says how the columns give the evaluator's score
    (:func:`scorer_of`)."""
    scorer_of(scorer)  # an unknown scorer is a bug of the evaluator, caught where it is written
    encoded = {name: _encode(values) for name, values in columns.items() if values is not None}
    if len({len(v) for v in encoded.values()}) > 1:
        raise ValueError(f"per-example columns differ in length: { {k: len(v) for k, v in encoded.items()} }")
    return {"scorer": scorer, "columns": encoded}


def decode_examples(stored: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The columns :func:`encode_examples` stored, as arrays (class ids int64, the rest float64)."""
    return {name: _decode(value) for name, value in stored["columns"].items()}


def scorer_of(scorer: str) -> tuple[tuple[str, ...], Callable[..., float] | None]:
    """The columns a scorer reads and the metric over them (None: the mean of the one column).

    ``glue:<task>``: GLUE's per-task score of (labels, predictions); ``accuracy``: top-1 accuracy of
    (labels, predictions); ``mean:<column>``: the mean of that column (e.g. a per-example KL).
    """
    kind, _, arg = scorer.partition(":")
    if kind == "glue" and arg:
        return ("labels", "predictions"), functools.partial(_glue_score, arg)
    if kind == "accuracy" and not arg:
        return ("labels", "predictions"), metrics.accuracy
    if kind == "mean" and arg:
        return (arg,), None
    raise ValueError(f"unknown per-example scorer {scorer!r}")


def _glue_score(task: str, labels: np.ndarray, predictions: np.ndarray) -> float:
    return metrics.glue_metrics(task, labels, predictions)["score"]


def _is_accuracy(scorer: str) -> bool:
    kind, _, task = scorer.partition(":")
    return kind == "accuracy" or (kind == "glue" and set(metrics.glue_metrics(task, [0], [0])) == {"accuracy", "score"})


def score_inputs(stored: Mapping[str, Any]) -> tuple[tuple[np.ndarray, ...], Callable[..., float] | None]:
    """The arrays and metric that reproduce the evaluator's score from a record's stored examples, in
    the form ``eval.stats`` takes: an accuracy becomes ``(labels, correct)`` with metric None (a mean,
    resampled in one gather), a mean column ``(column,)``, anything else its columns and metric."""
    names, metric = scorer_of(stored["scorer"])
    columns = decode_examples(stored)
    arrays = tuple(columns[n] for n in names)
    if _is_accuracy(stored["scorer"]):
        labels, predictions = arrays
        return (labels, (labels == predictions).astype(np.float64)), None
    return arrays, metric
