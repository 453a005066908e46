"""The evaluator interface, the context it gets besides the model, and the registry (by name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from torch import nn

from deltadct.errors import ConfigError
from deltadct.methods.base import MethodConfig

from .errors import EvalError


@dataclass
class EvalContext:
    """Everything an evaluator may need besides the model."""

    task: str  # e.g. "sst2", "parity", "zoo_sst2_sentiment"
    data: dict  # the task's data spec, e.g. ZooTask.data or {"kind": "glue", "task": "sst2", "data_dir": ...}
    processor: Any = None  # tokenizer or image transform from the adapter
    adapter: str | None = None
    reference: nn.Module | None = None  # the uncompressed fine-tuned model (reconstruction evaluator)
    device: str = "cpu"


@dataclass
class EvalOptions(MethodConfig):
    """Base of every evaluator's options (``conf/eval/<name>.yaml``): typed, validated, unknown keys refused.

    ``seed`` (inherited) seeds whatever an evaluator draws at random (sample subsets, example inputs).
    """


class Evaluator:
    """A registered evaluator: ``Evaluator(**options).evaluate(model, ctx)`` -> flat ``{metric: float}``,
    the task's headline metric also under ``"score"``."""

    name: ClassVar[str]
    Options: ClassVar[type[EvalOptions]] = EvalOptions

    def __init__(self, **options: Any):
        self.options = self.Options.from_dict(options)
        #: per-example outputs of the last ``evaluate`` call (``eval.examples.encode_examples``), or None
        #: for an evaluator that does not score examples one by one; the runner stores them in the record
        self.last_examples: dict | None = None

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        raise NotImplementedError


def require_processor(ctx: EvalContext, what: str = "a tokenizer") -> Any:
    if ctx.processor is None:
        raise EvalError(f"task {ctx.task!r} needs {what} but none was given (the checkpoint dir has no "
                        "tokenizer/processor files?)")
    return ctx.processor


def sample_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``max_samples`` of ``n`` examples, in their original order
    (all of them when ``max_samples`` is None or not smaller than ``n``)."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


_REGISTRY: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: add an :class:`Evaluator` subclass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"evaluator {cls.name!r} registered twice ({_REGISTRY[cls.name]} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def list_evaluators() -> list[str]:
    return sorted(_REGISTRY)


def get_evaluator(name: str) -> type[Evaluator]:
    """The evaluator class registered as ``name`` (instantiate it with its options)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown evaluator {name!r}; available: {', '.join(list_evaluators())}") from None
