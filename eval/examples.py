"""Per-example outputs of an evaluation, in the compact JSON form result records store.

An evaluator that scores examples one by one keeps its outputs in ``Evaluator.last_examples``
(``encode_examples(labels=…, predictions=…)``); the runner stores them in the record under
``examples.<evaluator>``, so tables can run paired tests (the same examples under two methods) and
bootstrap over examples from the result store alone. Small integers (class ids, -1 for an answer
outside the label set) become one character each (``"0110-2"``); anything else a list of floats
rounded to 6 significant digits. ``index`` (present when a subset was evaluated) holds the example
positions in the full split.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

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


def encode_examples(**columns: Any) -> dict[str, str | list[float]]:
    """JSON-able per-example columns (all of one length), e.g. ``labels=…, predictions=…``."""
    encoded = {name: _encode(values) for name, values in columns.items() if values is not None}
    if len({len(v) for v in encoded.values()}) > 1:
        raise ValueError(f"per-example columns differ in length: { {k: len(v) for k, v in encoded.items()} }")
    return encoded


def decode_examples(stored: Mapping[str, str | list]) -> dict[str, np.ndarray]:
    """The arrays :func:`encode_examples` stored (class ids as int64, the rest float64)."""
    return {name: _decode(value) for name, value in stored.items()}
