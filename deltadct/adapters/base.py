"""The one interface every model family implements, and the registry that finds them by name.

An adapter knows how a family's checkpoints become models: how to load one, how to build the same
architecture around a reconstructed state dict (what :func:`deltadct.apply` returns), which
tokenizer / image transform goes with it and how to save it again. It also knows how to make a few
deterministic example inputs and read logits from the model's output, so data-free checks (the
reconstruction evaluator) need no per-family code. Heavy libraries (transformers, timm) are imported
inside the methods, so ``import deltadct.adapters`` costs nothing.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..checkpoints import describe_keys
from ..errors import CheckpointError, DeltaDCTError, KeyMismatchError, ShapeMismatchError
from ..registry import Registry

PathLike = str | Path


class AdapterError(DeltaDCTError):
    """A model family cannot do what was asked (e.g. run a model whose code deltadct does not ship)."""


class ModelAdapter(abc.ABC):
    """How one model family is loaded, rebuilt from a state dict, run on example inputs and saved."""

    name: ClassVar[str]
    #: policy overrides this family needs by default (e.g. {"extra_keys": "keep"} for new task heads)
    policy_defaults: ClassVar[dict] = {}
    #: what raw calibration samples the family's models take: "text", "image", or None (cannot run)
    modality: ClassVar[str | None] = None

    @abc.abstractmethod
    def load(self, path: PathLike, *, device: str = "cpu") -> nn.Module:
        """The checkpoint at ``path`` as a model in eval mode."""

    def load_processor(self, path: PathLike) -> Any:
        """The tokenizer or image transform stored with the checkpoint, or None if there is none."""
        return None

    @abc.abstractmethod
    def load_with_state_dict(self, path: PathLike, state_dict: Mapping[str, torch.Tensor], *,
                             device: str = "cpu") -> nn.Module:
        """The architecture of the checkpoint at ``path`` with the weights of ``state_dict``.

        Loading is strict: a missing, unexpected or wrongly shaped tensor raises a typed error.
        """

    @abc.abstractmethod
    def save(self, model: nn.Module, out_dir: PathLike) -> Path:
        """Write ``model`` in the family's normal format; return the path written."""

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        """``num`` deterministic model inputs (keyword arguments of ``model``), independent of any data."""
        raise AdapterError(f"adapter {self.name!r} cannot build example inputs")

    def calibration_inputs(self, model: nn.Module, processor: Any, samples: list, *,
                           seq_len: int) -> list[dict[str, torch.Tensor]]:
        """Model inputs (keyword arguments of ``model``, one sample each) for raw task samples: texts
        (a string or a tuple of strings, truncated to ``seq_len`` tokens) or PIL images."""
        raise AdapterError(f"adapter {self.name!r} cannot run its models on calibration data")

    def logits(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's output logits for ``inputs`` (class or vocabulary axis last)."""
        return model(**inputs).logits

    # -- what evaluators ask the family (instead of inspecting the model) --------------------------
    #: how the family's models answer a labelled task: "classify" (argmax of a classifier head),
    #: "generate" (text, read as a label word) or None (neither; e.g. language models, scored by lm-eval)
    answers_by: ClassVar[str | None] = None

    def handles(self, model: nn.Module) -> bool:
        """Whether ``model`` is one of this family's models (see :func:`adapter_for`)."""
        return False

    def num_classes(self, model: nn.Module) -> int:
        """The number of classes the model's classifier head predicts."""
        raise AdapterError(f"adapter {self.name!r} has no classifier head")

    def input_channels(self, model: nn.Module) -> int:
        """The number of image channels the model takes (1 = grey, 3 = RGB)."""
        raise AdapterError(f"adapter {self.name!r} does not take images")

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs (keyword arguments of ``model`` and of :meth:`logits`) for a batch of images."""
        raise AdapterError(f"adapter {self.name!r} does not take images")

    def image_features(self, model: nn.Module, pixels: torch.Tensor, dim: int) -> torch.Tensor:
        """The image embedding that a zero-shot head of width ``dim`` scores against."""
        raise AdapterError(f"adapter {self.name!r} has no image embedding")

    def generate(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], *, max_new_tokens: int) -> torch.Tensor:
        """Greedy answer token ids for ``inputs`` (the prompt left out)."""
        raise AdapterError(f"adapter {self.name!r} does not generate text")


def checkpoint_path(path: PathLike) -> Path:
    """``path`` as a Path, or a CheckpointError if nothing is there."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def check_state_dict_fits(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor], *,
                          where: PathLike, optional: set[str] = frozenset()) -> None:
    """Raise unless ``state_dict`` has exactly the ``expected`` names (``optional`` ones may be absent)
    with the expected shapes. ``where`` names the architecture's checkpoint in the message."""
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict) - set(optional))
    if unexpected:
        raise KeyMismatchError(f"{len(unexpected)} tensor(s) do not belong to the architecture of {where}: "
                               f"{describe_keys(unexpected)}")
    if missing:
        raise KeyMismatchError(f"{len(missing)} tensor(s) of the architecture of {where} are missing from the "
                               f"state dict: {describe_keys(missing)}")
    wrong = [k for k in state_dict if tuple(state_dict[k].shape) != tuple(expected[k])]
    if wrong:
        key = wrong[0]
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {list(state_dict[key].shape)} in the state dict but {list(expected[key])} "
            f"in the architecture of {where}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


ADAPTERS: Registry[ModelAdapter] = Registry("model adapter", ModelAdapter, entry_point_group="deltadct.adapters")

#: class decorator: add a :class:`ModelAdapter` subclass to the registry under ``cls.name``
register_adapter = ADAPTERS.register


def list_adapters() -> list[str]:
    return ADAPTERS.names()


def get_adapter_class(name: str) -> type[ModelAdapter]:
    """The :class:`ModelAdapter` subclass registered as ``name``."""
    return ADAPTERS.get(name)


def create_adapter(name: str) -> ModelAdapter:
    """A fresh instance of the adapter registered as ``name`` (adapters take no options)."""
    return ADAPTERS.create(name)


#: the adapter registered as ``name``, as an instance (the name callers have always used for :func:`create_adapter`)
get_adapter = create_adapter


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter whose family ``model`` belongs to (the first in name order that handles it)."""
    for name in list_adapters():
        adapter = create_adapter(name)
        if adapter.handles(model):
            return adapter
    raise AdapterError(f"no registered model adapter handles a {type(model).__name__}; name the model's adapter "
                       f"(one of {', '.join(list_adapters())})")
