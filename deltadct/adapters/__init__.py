"""Model adapters: how each model family is loaded, rebuilt around a reconstructed state dict and saved.

``create_adapter("hf_seqcls").load_with_state_dict(finetuned_dir, deltadct.apply(base, delta))`` gives the
fine-tuned architecture with the reconstructed weights. Every module of this package registers its
adapter on import; importing the package imports them all, so ``list_adapters()`` is complete. Other
packages add families through the ``deltadct.adapters`` entry-point group (see :mod:`deltadct.registry`).
"""
from __future__ import annotations

from ..registry import import_submodules
from .base import (ADAPTERS, AdapterError, ModelAdapter, adapter_for, create_adapter, get_adapter, get_adapter_class,
                   list_adapters, register_adapter)

import_submodules(__name__, __path__, exclude=("base",))

__all__ = ["ADAPTERS", "AdapterError", "ModelAdapter", "adapter_for", "create_adapter", "get_adapter",
           "get_adapter_class", "list_adapters", "register_adapter"]
