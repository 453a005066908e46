"""The one interface every model family implements, and the registry that finds them by name.

An adapter knows how a family's checkpoints become models: how to load one, how to build the same
architecture around a reconstructed state dict (what :func:`deltadct.apply` returns), which
tokenizer / image transform goes with it and how to save it again. It also knows how to make a few
deterministic example inputs and read logits from the model's output, so data-free checks (the
reconstruction evaluator) need no per-family code. Heavy libraries (transformers, timm) are imported
inside the methods, so ``import deltadct.adapters`` costs nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..checkpoints import describe_keys
from ..errors import CheckpointError, ConfigError, DeltaDCTError, KeyMismatchError, ShapeMismatchError

PathLike = str | Path


class AdapterError(DeltaDCTError):
    """A model family cannot do what was asked (e.g. run a model whose code deltadct does not ship)."""


class ModelAdapter:
    """How one model family is loaded, rebuilt from a state dict, run on example inputs and saved."""

    name: ClassVar[str]
    #: policy overrides this family needs by default (e.g. {"extra_keys": "keep"} for new task heads)
    policy_defaults: ClassVar[dict] = {}
    #: what raw calibration samples the family's models take: "text", "image", or None (cannot run)
    modality: ClassVar[str | None] = None

    def load(self, path: PathLike, *, device: str = "cpu") -> nn.Module:
        """The checkpoint at ``path`` as a model in eval mode."""
        raise NotImplementedError

    def load_processor(self, path: PathLike) -> Any:
        """The tokenizer or image transform stored with the checkpoint, or None if there is none."""
        return None

    def load_with_state_dict(self, path: PathLike, state_dict: Mapping[str, torch.Tensor], *,
                             device: str = "cpu") -> nn.Module:
        """The architecture of the checkpoint at ``path`` with the weights of ``state_dict``.

        Loading is strict: a missing, unexpected or wrongly shaped tensor raises a typed error.
        """
        raise NotImplementedError

    def save(self, model: nn.Module, out_dir: PathLike) -> Path:
        """Write ``model`` in the family's normal format; return the path written."""
        raise NotImplementedError

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


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: add a :class:`ModelAdapter` subclass to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"adapter {cls.name!r} registered twice ({_REGISTRY[cls.name]} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def list_adapters() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(name: str) -> ModelAdapter:
    """A fresh instance of the adapter registered as ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(f"unknown model adapter {name!r}; available: {', '.join(list_adapters())}") from None
