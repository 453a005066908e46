"""Registry of compression methods (timm-style): ``register_method``, ``create_method``, ``list_methods``.

Each method lives in its own small module and registers itself on import; importing this package
imports them all, so ``list_methods()`` is complete. Other packages add methods through the
``deltadct.methods`` entry-point group (see :mod:`deltadct.registry`).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import UnknownMethodError
from ..registry import Registry, import_submodules
from .base import Compressed, Method, MethodConfig, versioned_field

METHODS: Registry[Method] = Registry("method", Method, error=UnknownMethodError, entry_point_group="deltadct.methods")

#: class decorator: add a :class:`Method` subclass to the registry under ``cls.name``
register_method = METHODS.register


def list_methods() -> list[str]:
    return METHODS.names()


def get_method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass registered as ``name``."""
    return METHODS.get(name)


def create_method(name: str | Method | MethodConfig, config: Mapping[str, Any] | MethodConfig | None = None,
                  **overrides: Any) -> Method:
    """A registered method with a validated config (dict and/or keyword overrides).

    ``name`` may also be a ready :class:`Method` (returned as is, or rebuilt when ``overrides`` change
    its config) or a method's config object (``DeltaDCT.Config(patch_size=32)``), whose class says
    which method it configures.
    """
    if isinstance(name, (Method, MethodConfig)):
        if isinstance(config, MethodConfig):
            raise TypeError("create_method takes one config object: pass it as the first argument")
        changes = {**(config or {}), **overrides}
        if isinstance(name, Method):
            return type(name)(name.config, **changes) if changes else name
        return method_for_config(name)(name, **changes)
    return get_method_class(name)(config, **overrides)


def method_for_config(config: MethodConfig) -> type[Method]:
    """The registered method whose ``Config`` is exactly ``type(config)``."""
    for method_name in list_methods():
        if get_method_class(method_name).Config is type(config):
            return get_method_class(method_name)
    raise UnknownMethodError(f"no registered method is configured by {type(config).__qualname__}; "
                             f"available: {', '.join(list_methods())}")


import_submodules(__name__, __path__, exclude=("base",))

__all__ = ["Compressed", "METHODS", "Method", "MethodConfig", "register_method", "list_methods",
           "get_method_class", "create_method", "method_for_config", "versioned_field"]
