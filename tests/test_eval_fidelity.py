"""Fidelity evaluator: KL(fine-tuned ‖ model) on the task's validation inputs; 0 for the uncompressed
delta (`none`), positive for `zero`; the per-example KL against scipy's entropy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

import deltadct
from deltadct.adapters import get_adapter
from eval import EvalContext, EvalError, get_evaluator
from eval.examples import score_inputs
from eval.fidelity import per_example_kl
from eval_zoo import fast_zoo, zero_reconstruction


def test_per_example_kl_against_scipy_and_the_gaussian_formula():
    rng = np.random.default_rng(0)
    ref, ours = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    expected = [entropy(softmax(r), softmax(o)) for r, o in zip(ref, ours, strict=True)]
    got = per_example_kl(torch.from_numpy(ref), torch.from_numpy(ours))
    assert got.numpy() == pytest.approx(expected, rel=1e-10)
    # one output (regression): KL(N(a, 1) ‖ N(b, 1)) = (a − b)² / 2
    got = per_example_kl(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.5], [0.0]]))
    assert got.tolist() == pytest.approx([0.125, 4.5])


def _none_reconstruction(adapter_name: str, family: str, task_name: str):
    entry = fast_zoo(family)
    task = entry.tasks[task_name]
    adapter = get_adapter(adapter_name)
    delta = deltadct.compress(entry.base_path, task.path, "none", policy=adapter.policy_defaults, progress=False)
    return adapter.load_with_state_dict(task.path, deltadct.apply(entry.base_path, delta, progress=False))


@pytest.mark.parametrize("family,adapter_name,task_name", [("vit", "timm_vit", "parity"),
                                                           ("minilm", "hf_seqcls", "sst2")])
def test_zero_for_the_uncompressed_delta_and_positive_for_zero(family, adapter_name, task_name):
    entry = fast_zoo(family)
    task = entry.tasks[task_name]
    adapter = get_adapter(adapter_name)
    ctx = EvalContext(task_name, task.data, adapter.load_processor(task.path), adapter_name,
                      reference=adapter.load(task.path))
    evaluator = get_evaluator("fidelity")(progress=False)

    same = evaluator.evaluate(_none_reconstruction(adapter_name, family, task_name), ctx)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    assert same["score"] == same["kl"]
    zero = evaluator.evaluate(zero_reconstruction(adapter_name, family, task_name), ctx)
    assert zero["kl"] > 1e-3 and zero["top1_agreement"] < 1.0
    # every validation input of the zoo task, and per-example values that average to the score
    images = list(Path(task.data["root"]).glob("*/*.png")) if "root" in task.data else None
    assert zero["num_examples"] == (len(images) if images is not None else task.data["num_examples"])
    arrays, metric = score_inputs(evaluator.last_examples)
    assert metric is None and float(np.mean(arrays[0])) == pytest.approx(zero["kl"], rel=1e-5)


def test_needs_the_reference_and_a_supported_data_kind():
    evaluator = get_evaluator("fidelity")()
    with pytest.raises(EvalError, match="needs the fine-tuned reference"):
        evaluator.evaluate(torch.nn.Linear(2, 2), EvalContext("t", {}))
    with pytest.raises(EvalError, match="not data kind 'lm_eval'"):
        evaluator.evaluate(torch.nn.Linear(2, 2),
                           EvalContext("t", {"kind": "lm_eval"}, reference=torch.nn.Linear(2, 2)))
