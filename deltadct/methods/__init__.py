"""Registry of compression methods (timm-style): ``register_method``, ``create_method``, ``list_methods``.

Each method lives in its own small module and registers itself on import; importing this package
imports them all, so ``list_methods()`` is complete.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import UnknownMethodError
from .base import Compressed, Method, MethodConfig

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} registered twice ({_REGISTRY[name]} and {cls})")
    _REGISTRY[name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(list_methods())}") from None


def create_method(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Method:
    """Instantiate a registered method with a validated config (dict and/or keyword overrides)."""
    return get_method_class(name)(config, **overrides)


def _import_all() -> None:
    """Import every module of this package so each method registers itself (no list to keep in sync)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["Compressed", "Method", "MethodConfig", "register_method", "list_methods",
           "get_method_class", "create_method"]
