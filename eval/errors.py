"""The evaluators' error type: every bad evaluation input maps to it, with one line saying what and where."""
from __future__ import annotations

from deltadct.errors import DeltaDCTError


class EvalError(DeltaDCTError):
    """An evaluation that cannot run: unknown task, missing data split, label set that does not fit the
    model, missing tokenizer or reference model."""
