"""One registry for every pluggable kind: compression methods, model adapters, evaluators, zoo families.

A :class:`Registry` maps names to classes derived from one base class. Classes join it with the
:meth:`Registry.register` decorator, which checks that the class derives from the base, is concrete
(implements every abstract method) and has a ``name``; ``get`` gives the class, ``create`` an instance,
``names`` the sorted names. An unknown name raises the registry's error type (a subclass of
:class:`~deltadct.errors.UnknownNameError`) naming every known entry.

Other packages add entries without editing this one through an entry-point group (e.g.
``deltadct.methods``): each entry point names a module (importing it registers its classes) or a class
(registered if it is not yet), and is loaded the first time the registry is asked for its entries::

    # pyproject.toml of a user package
    [project.entry-points."deltadct.methods"]
    my_method = "my_package.my_method:MyMethod"
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from importlib import metadata
from typing import Any, Generic, Iterable, Iterator, TypeVar

from .errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → subclasses of ``base``; see the module docstring.

    ``kind`` names the entries in messages ("method", "model adapter", …); ``error`` is raised for an
    unknown name; ``entry_point_group`` is the group whose entry points are plugins (None: no plugins).
    """

    def __init__(self, kind: str, base: type[T], *, error: type[UnknownNameError] = UnknownNameError,
                 entry_point_group: str | None = None):
        self.kind = kind
        self.base = base
        self.error = error
        self.entry_point_group = entry_point_group
        self._classes: dict[str, type[T]] = {}
        self._plugins_loaded = entry_point_group is None

    # -- registration --------------------------------------------------------------------------
    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: add ``cls`` under ``cls.name`` after checking it can be used."""
        if not (inspect.isclass(cls) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a subclass of {self.base.__qualname__}; only those are {self.kind}s")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} class {cls.__qualname__} has no name (set the class attribute `name`)")
        if inspect.isabstract(cls):
            missing = sorted(getattr(cls, "__abstractmethods__", ()))
            raise TypeError(f"{self.kind} {name!r} ({cls.__qualname__}) does not implement {', '.join(missing)}")
        known = self._classes.get(name)
        if known is not None and _where(known) != _where(cls):
            raise ValueError(f"{self.kind} {name!r} registered twice ({_where(known)} and {_where(cls)})")
        # the same class defined again (its module reloaded) replaces the old one
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry take it out again with this)."""
        self._classes.pop(name, None)

    # -- lookup --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``."""
        self._load_plugins()
        try:
            return self._classes[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config file
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """An instance of the class registered as ``name``, built with ``args`` / ``kwargs``."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    # -- plugins -------------------------------------------------------------------------------
    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first, so a plugin that asks for the registry does not recurse
        for entry_point in metadata.entry_points(group=self.entry_point_group):
            try:
                loaded = entry_point.load()
            # A plugin is third-party code: importing it can raise anything; report it as a config problem.
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"{self.kind} plugin {entry_point.name!r} ({entry_point.value}, entry point "
                                  f"group {self.entry_point_group}) does not load: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from None
            if inspect.isclass(loaded) and loaded not in self._classes.values():
                try:
                    self.register(loaded)
                except (TypeError, ValueError) as err:
                    raise ConfigError(f"{self.kind} plugin {entry_point.name!r} ({entry_point.value}): {err}") from None


def import_submodules(package: str, path: Iterable[str], *, exclude: Iterable[str] = ()) -> None:
    """Import every module of ``package`` (whose ``__path__`` is ``path``) but ``exclude``, so each one
    registers its classes: a package's registry is complete once the package is imported, with no
    list of modules to keep in sync."""
    skip = set(exclude)
    for module in pkgutil.iter_modules(path):
        if not module.ispkg and module.name not in skip:
            importlib.import_module(f"{package}.{module.name}")


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
