"""Fidelity evaluator: KL(fine-tuned ‖ model) on the task's validation inputs; 0 for the uncompressed
delta (`none`), positive for `zero`; the per-example KL against scipy's entropy; forward passes shared
with the task metric."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

import deltadct
from deltadct.adapters import get_adapter
from eval import EvalContext, EvalError, get_evaluator
from eval.base import MAX_SHARED_OUTPUTS, shared_outputs
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


def test_shared_outputs_runs_each_forward_once_per_model_weights_and_batch():
    model, calls = torch.nn.Linear(3, 2), []

    def compute():
        calls.append(1)
        return model(torch.ones(4, 3))

    first = shared_outputs(model, "batch 0", compute)
    assert shared_outputs(model, "batch 0", compute) is first and len(calls) == 1
    shared_outputs(model, "batch 1", compute)
    assert len(calls) == 2
    with torch.no_grad():
        model.weight.add_(1.0)  # in place: the old outputs no longer describe this model
    again = shared_outputs(model, "batch 0", compute)
    assert len(calls) == 3 and not torch.equal(again, first)
    # a vocabulary-sized output is computed each time, not kept
    wide = torch.nn.Linear(3, MAX_SHARED_OUTPUTS + 1)
    shared_outputs(wide, "b", lambda: (calls.append(1), wide(torch.ones(2, 3)))[1])
    shared_outputs(wide, "b", lambda: (calls.append(1), wide(torch.ones(2, 3)))[1])
    assert len(calls) == 5


@pytest.mark.parametrize("family,adapter_name,task_name,metric", [("minilm", "hf_seqcls", "sst2", "glue"),
                                                                  ("vit", "timm_vit", "parity", "vision")])
def test_task_metric_and_fidelity_share_forward_passes_with_the_same_numbers(family, adapter_name, task_name,
                                                                             metric):
    """The runner scores each compressed model with the task metric, then fidelity. With the same batches
    (GLUE: both 64) the model runs once, else once per evaluator; the reference runs once for a whole sweep
    (every compressed model of it). The numbers are the unshared ones."""
    entry = fast_zoo(family)
    task = entry.tasks[task_name]
    adapter = get_adapter(adapter_name)
    # copies: other tests' passes of these models are shared too
    reference = adapter.load(task.path)
    models = [copy.deepcopy(zero_reconstruction(adapter_name, family, task_name)) for _ in range(2)]
    ctx = EvalContext(task_name, task.data, adapter.load_processor(task.path), adapter_name, reference=reference)
    passes = {"reference": 0, 0: 0, 1: 0}
    for name, net in (("reference", reference), (0, models[0]), (1, models[1])):
        net.register_forward_hook(lambda *_, name=name: passes.__setitem__(name, passes[name] + 1))
    task_eval, fidelity = get_evaluator(metric)(progress=False), get_evaluator("fidelity")(progress=False)
    n = task.data.get("num_examples") or len(list(Path(task.data["root"]).glob("*/*.png")))
    task_batches, fidelity_batches = -(-n // task_eval.options.batch_size), -(-n // fidelity.options.batch_size)
    shared = task_batches == fidelity_batches
    score = task_eval.evaluate(models[0], ctx)["score" if metric == "vision" else "accuracy"]
    kl = fidelity.evaluate(models[0], ctx)["kl"]
    expected = {"reference": fidelity_batches, 0: task_batches + (0 if shared else fidelity_batches), 1: 0}
    assert passes == expected
    fidelity.evaluate(models[0], ctx)
    fidelity.evaluate(models[1], ctx)  # the next job of a sweep: its own passes, none of the reference
    assert passes == {**expected, 1: fidelity_batches}

    # unshared: fresh copies of both models (new weights, so nothing cached applies)
    fresh_ctx = EvalContext(task_name, task.data, ctx.processor, adapter_name, reference=adapter.load(task.path))
    fresh = copy.deepcopy(models[0])
    again = get_evaluator(metric)(progress=False).evaluate(fresh, fresh_ctx)
    assert again["score" if metric == "vision" else "accuracy"] == score
    assert get_evaluator("fidelity")(progress=False).evaluate(fresh, fresh_ctx)["kl"] == pytest.approx(kl, rel=1e-6)
