"""The one interface every compression method implements, and the config plumbing they share.

A method sees one delta tensor at a time (float32, already on the target device) and returns a
:class:`Compressed`: the tensors that go into the file (packed integers, scales) plus a small
JSON-able ``meta`` dict. ``reconstruct`` turns that back into a float32 delta of the same shape.
Methods never touch files, models or Hydra configs: those live in :mod:`deltadct.api`,
:mod:`deltadct.format` and ``experiments/``.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..errors import ConfigError


@dataclass
class Compressed:
    """One compressed tensor: file payload plus small metadata.

    ``tensors`` values are written verbatim to the file (keys are field names, e.g. ``"codes"``);
    ``meta`` must be JSON-serialisable (ints, floats, strings, lists) and is stored in the header.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Compressed":
        return Compressed({k: v.to(device) for k, v in self.tensors.items()}, dict(self.meta))

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def versioned_field(default: Any, *, since: int, before: Any) -> Any:
    """A config field added in version ``since`` of its config class (``Config.VERSION`` raised to it):
    files written before it lack the option, and were made by code that behaved as ``before`` says.

    >>> gain: float = versioned_field(1.0, since=2, before=0.5)   # files of version 1 meant 0.5
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("versioned_field takes immutable defaults (a tuple, not a list)")
    return field(default=default, metadata={"since": since, "before": before})


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses add fields and override :meth:`validate`.

    ``seed`` is on every config so that randomised methods (DARE) are reproducible and
    deterministic methods accept it harmlessly in a sweep.

    ``VERSION`` is recorded in every file next to the config. A subclass that gains an option raises
    it and declares the option with :func:`versioned_field`, so that :meth:`from_recorded` reads files
    written before with the value they implied, never with today's default.
    """

    VERSION: ClassVar[int] = 1

    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field and value at fault."""

    @classmethod
    def from_recorded(cls, values: Mapping[str, Any], version: int = 1) -> "MethodConfig":
        """The config a file recorded (``values``, written at config ``version``): an option the file
        lacks because it was added after ``version`` takes the value files of that version implied."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"config version {version!r} of {cls.__qualname__} is not a positive integer")
        if version > cls.VERSION:
            raise ConfigError(f"the config was written at version {version} of {cls.__qualname__}, newer than "
                              f"this deltadct reads ({cls.VERSION}); upgrade deltadct")
        implied = {f.name: f.metadata["before"] for f in dataclasses.fields(cls)
                   if f.metadata.get("since", 1) > version}
        return cls.from_dict({**implied, **values})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> "MethodConfig":
        merged = {**(values or {}), **overrides}
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for {cls.__qualname__}; valid options: {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, v, hints[k]) for k, v in merged.items()}
        cfg = cls(**coerced)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept what a CLI ``--set key=value`` or a YAML file gives (strings, lists) for typed fields."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    try:
        if origin in (tuple, list):
            if isinstance(value, str):
                bare = value.replace("(", "").replace(")", "").replace("[", "").replace("]", "")
                value = [v for v in bare.split(",") if v.strip()]
            elem = args[0] if args else float
            return tuple(_coerce(name, v, elem) for v in value)
        if hint is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r}: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"option {name!r}: {value!r} is not one of {list(choices)}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False) -> None:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"option {name!r}: {value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"option {name!r}: {value!r} must be <= {hi}")


@dataclass(frozen=True)
class SizeKnob:
    """The option through which a method trades size for accuracy, for runs matched to a bits target.

    A matched-bits run (``experiments/budget.py``) searches ``low..high`` for the value whose written
    file measures the target; ``options(value)`` are the method options that realise it (one knob may
    set several fields, e.g. Delta-DCT's ratios and budget). The measured size must be monotone in
    the value: rising with it, or falling when ``decreasing`` (DARE's drop probability). ``integer``
    knobs take whole values only (an index into a ladder of settings, for example).
    """

    name: str
    low: float
    high: float
    options: Callable[[float], dict[str, Any]]
    integer: bool = False
    decreasing: bool = False


class Method(abc.ABC):
    """A registered compression method.

    Subclasses set ``name`` and ``Config`` and implement :meth:`compress` / :meth:`reconstruct`.
    ``plan`` is an optional pre-pass over every delta (streamed once) for methods that allocate
    bits across layers; ``compress`` then reads what ``plan`` decided for the named tensor.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: whether :meth:`plan` must see every delta before :meth:`compress` (global allocation)
    needs_plan: ClassVar[bool] = False
    #: whether :meth:`compress` takes ``hessian=``: the Hessian 2·XᵀX/n of the layer's inputs, one row and
    #: column per column of :func:`as_matrix` of the delta, from calibration data (:mod:`deltadct.calibration`)
    needs_calibration: ClassVar[bool] = False

    @classmethod
    def from_recorded(cls, values: Mapping[str, Any], version: int = 1) -> "Method":
        """The method that decodes a file recording ``values`` at config ``version``.

        Usually this class, configured by :meth:`MethodConfig.from_recorded`. A name whose files changed
        meaning with a config version (``delta_come`` was the data-free variant before version 2)
        overrides :meth:`decoder_for` to hand older files to the class that wrote them.
        """
        decoder = cls.decoder_for(version)
        return decoder(decoder.Config.from_recorded(values, version))

    @classmethod
    def decoder_for(cls, version: int) -> type["Method"]:
        """The class whose decoder reads files of config ``version`` written under this name."""
        return cls

    def __init__(self, config: MethodConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if isinstance(config, MethodConfig):
            if overrides:
                config = type(config).from_dict(config.to_dict(), **overrides)
            else:
                config.validate()
        else:
            config = self.Config.from_dict(config, **overrides)
        self.config = config

    def plan(self, deltas: Iterable[tuple[str, torch.Tensor]], *, header_bytes: int = 0) -> None:
        """Look at every (name, delta) once before compressing; default: nothing to plan.

        ``header_bytes``: what the file will spend outside the compressed tensors' own entries
        (config, policy, kept tensors), for methods that fill a budget measured on disk.
        """

    def size_knob(self) -> SizeKnob | None:
        """The knob a matched-bits run searches; None: the method has one size (reported as it is)."""
        return None

    def check_shape(self, shape: tuple[int, ...], name: str = "") -> None:
        """Raise :class:`ConfigError` if a tensor of this shape cannot be compressed (e.g. smaller than a patch)."""

    @abc.abstractmethod
    def compress(self, delta: torch.Tensor, *, name: str = "") -> Compressed:
        """The file payload of one delta tensor; methods with :attr:`needs_calibration` also take ``hessian=``."""

    @abc.abstractmethod
    def reconstruct(self, compressed: Compressed, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The float32 delta of ``shape`` that ``compressed`` stands for."""

    def generator(self, name: str, device: torch.device) -> torch.Generator:
        """A per-tensor RNG seeded from the config seed and the tensor name (order-independent)."""
        import zlib

        gen = torch.Generator(device=device)
        gen.manual_seed((self.config.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        return gen

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """View a weight as 2-D: (out, in·k·k) for convs, (1, n) for vectors, itself for matrices."""
    if delta.ndim == 2:
        return delta
    if delta.ndim == 0:
        return delta.reshape(1, 1)
    if delta.ndim == 1:
        return delta.reshape(1, -1)
    return delta.reshape(delta.shape[0], -1)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, cols) that :func:`as_matrix` gives a tensor of ``shape``, without allocating it."""
    return tuple(as_matrix(torch.empty(tuple(shape), device="meta")).shape)  # type: ignore[return-value]
