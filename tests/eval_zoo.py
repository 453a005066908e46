"""Zoo access shared by the evaluator tests: the FAST zoos (cached under $DELTADCT_CACHE) and the
``zero`` reconstruction (base weights + the fine-tuned new heads) that the zoo's ``base_score`` measures."""
from __future__ import annotations

import deltadct
from deltadct.adapters import get_adapter


def fast_zoo(family: str):
    from experiments.zoo import build_zoo

    return build_zoo(family, "fast", progress=False)


def zero_reconstruction(adapter_name: str, entry, task):
    """The fine-tuned architecture with what the ``zero`` method reconstructs when every tensor the base
    has is left to the base (``others=drop``): the base model plus the fine-tuned new head."""
    adapter = get_adapter(adapter_name)
    policy = {**adapter.policy_defaults, "others": "drop"}
    delta = deltadct.compress(entry.base_path, task.path, "zero", policy=policy, progress=False)
    return adapter.load_with_state_dict(task.path, deltadct.apply(entry.base_path, delta, progress=False))
