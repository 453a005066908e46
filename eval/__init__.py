"""Evaluators: score a (reconstructed) model on a task. ``create_evaluator("glue", max_samples=200).evaluate(
model, EvalContext(task="sst2", data={...}, processor=tokenizer, adapter=adapter))`` -> ``{"accuracy": …, "score": …}``.

Every module of this package registers its evaluator on import; importing the package imports them
all, so ``list_evaluators()`` is complete. Other packages add evaluators through the
``deltadct.evaluators`` entry-point group (see :mod:`deltadct.registry`). Heavy libraries are imported
inside the evaluators.
"""
from __future__ import annotations

from deltadct.registry import import_submodules

from .base import (EVALUATORS, EvalContext, EvalOptions, Evaluator, create_evaluator, get_evaluator, list_evaluators,
                   register_evaluator)
from .errors import EvalError

import_submodules(__name__, __path__, exclude=("base", "errors"))

__all__ = ["EVALUATORS", "EvalContext", "EvalError", "EvalOptions", "Evaluator", "create_evaluator", "get_evaluator",
           "list_evaluators", "register_evaluator"]
