"""Model adapters: how each model family is loaded, rebuilt around a reconstructed state dict and saved.

``get_adapter("hf_seqcls").load_with_state_dict(finetuned_dir, deltadct.apply(base, delta))`` gives the
fine-tuned architecture with the reconstructed weights. Every module of this package registers its
adapter on import; importing the package imports them all, so ``list_adapters()`` is complete.
"""
from __future__ import annotations

from .base import AdapterError, ModelAdapter, get_adapter, list_adapters, register_adapter


def _import_all() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["AdapterError", "ModelAdapter", "get_adapter", "list_adapters", "register_adapter"]
