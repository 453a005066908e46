"""The evaluator interface, the context it gets besides the model, and the registry (by name)."""
from __future__ import annotations

import abc
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deltadct.adapters import AdapterError, ModelAdapter, adapter_for, create_adapter
from deltadct.methods.base import MethodConfig
from deltadct.registry import Registry

from .errors import EvalError


@dataclass
class EvalContext:
    """Everything an evaluator may need besides the model."""

    task: str  # e.g. "sst2", "parity", "zoo_sst2_sentiment"
    data: dict  # the task's data spec, e.g. ZooTask.data or {"kind": "glue", "task": "sst2", "data_dir": ...}
    processor: Any = None  # tokenizer or image transform from the adapter
    #: the model family's adapter (a registered name is resolved to it); None: found from the model
    adapter: ModelAdapter | str | None = None
    reference: nn.Module | None = None  # the uncompressed fine-tuned model (reconstruction evaluator)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.adapter, str):
            self.adapter = create_adapter(self.adapter)

    def adapter_for(self, model: nn.Module) -> ModelAdapter:
        """The context's adapter, else the registered one whose family ``model`` belongs to."""
        if self.adapter is not None:
            return self.adapter
        try:
            return adapter_for(model)
        except AdapterError as err:
            raise EvalError(f"task {self.task!r}: {err}") from None


@dataclass
class EvalOptions(MethodConfig):
    """Base of every evaluator's options (``conf/eval/<name>.yaml``): typed, validated, unknown keys refused.

    ``seed`` (inherited) seeds whatever an evaluator draws at random (sample subsets, example inputs).
    """


class Evaluator(abc.ABC):
    """A registered evaluator: ``Evaluator(**options).evaluate(model, ctx)`` -> flat ``{metric: float}``,
    the task's headline metric also under ``"score"``."""

    name: ClassVar[str]
    Options: ClassVar[type[EvalOptions]] = EvalOptions

    def __init__(self, **options: Any):
        self.options = self.Options.from_dict(options)
        #: per-example outputs of the last ``evaluate`` call (``eval.examples.encode_examples``), or None
        #: for an evaluator that does not score examples one by one; the runner stores them in the record
        self.last_examples: dict | None = None

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """Flat ``{metric: value}`` of ``model`` on ``ctx.task``, the headline metric also under ``"score"``."""


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


def batches(items: Sequence, size: int, *, desc: str, progress: bool) -> Iterator[Sequence]:
    """Consecutive slices of ``size`` items, with a progress bar of batches unless ``progress`` is false."""
    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=not progress, leave=False):
        yield items[start:start + size]


#: outputs kept per example at most (a class axis, not a vocabulary: a T5 first-token distribution is not kept)
MAX_SHARED_OUTPUTS = 1024
_OUTPUTS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, torch.Tensor]] = weakref.WeakKeyDictionary()


def shared_outputs(model: nn.Module, inputs: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, the output of ``model`` on the batch that ``inputs`` names, run once per model and batch.

    The task metric and the fidelity evaluator read the same validation inputs, and the fine-tuned reference
    is the same model for every compressed one of a sweep: each such forward pass is run once (3 passes
    over each validation set per compressed model before, 1 now). ``inputs`` must name everything the
    batch is made from (data, split, example indices, encoding); a weight changed in place (its tensor
    version moves) makes a new entry. The outputs are freed with the model.
    """
    weights = tuple((id(p), p._version) for p in model.parameters())
    per_model = _OUTPUTS.setdefault(model, {})
    key = (weights, inputs)
    if key in per_model:
        return per_model[key]
    out = compute().detach()
    if out.numel() <= MAX_SHARED_OUTPUTS * max(1, out.shape[0]):
        per_model[key] = out
    return out


EVALUATORS: Registry[Evaluator] = Registry("evaluator", Evaluator, entry_point_group="deltadct.evaluators")

#: class decorator: add an :class:`Evaluator` subclass to the registry under ``cls.name``
register_evaluator = EVALUATORS.register


def list_evaluators() -> list[str]:
    return EVALUATORS.names()


def get_evaluator(name: str) -> type[Evaluator]:
    """The evaluator class registered as ``name`` (instantiate it with its options, or use :func:`create_evaluator`)."""
    return EVALUATORS.get(name)


def create_evaluator(name: str, **options: Any) -> Evaluator:
    """The evaluator registered as ``name`` with validated ``options``."""
    return EVALUATORS.create(name, **options)
