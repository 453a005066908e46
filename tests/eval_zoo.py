"""Zoo access shared by the evaluator tests: the FAST zoos (cached under $DELTADCT_CACHE) and the
``zero`` reconstruction (base weights + the fine-tuned new heads) that the zoo's ``base_score`` measures.
Both are memoised, so the test files share one build / one reconstruction per task."""
from __future__ import annotations

from functools import lru_cache

import deltadct
from deltadct.adapters import get_adapter


@lru_cache(maxsize=None)
def fast_zoo(family: str):
    from experiments.zoo import build_zoo

    return build_zoo(family, "fast", progress=False)


@lru_cache(maxsize=None)
def zero_reconstruction(adapter_name: str, family: str, task_name: str):
    """The fine-tuned architecture with what the ``zero`` method reconstructs when every tensor the base
    has is left to the base (``others=drop``): the base model plus the fine-tuned new head."""
    entry = fast_zoo(family)
    task = entry.tasks[task_name]
    adapter = get_adapter(adapter_name)
    policy = {**adapter.policy_defaults, "others": "drop"}
    delta = deltadct.compress(entry.base_path, task.path, "zero", policy=policy, progress=False)
    return adapter.load_with_state_dict(task.path, deltadct.apply(entry.base_path, delta, progress=False))
