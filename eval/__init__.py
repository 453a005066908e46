"""Evaluators: score a (reconstructed) model on a task. ``get_evaluator("glue")(max_samples=200).evaluate(
model, EvalContext(task="sst2", data={...}, processor=tokenizer))`` -> ``{"accuracy": …, "score": …}``.

Every module of this package registers its evaluator on import; importing the package imports them
all, so ``list_evaluators()`` is complete. Heavy libraries are imported inside the evaluators.
"""
from __future__ import annotations

from .base import EvalContext, EvalOptions, Evaluator, get_evaluator, list_evaluators, register_evaluator
from .errors import EvalError


def _import_all() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.ispkg or module.name in ("base", "errors"):
            continue
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["EvalContext", "EvalError", "EvalOptions", "Evaluator", "get_evaluator", "list_evaluators",
           "register_evaluator"]
