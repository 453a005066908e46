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


def test_glue_then_fidelity_runs_one_pass_per_model_and_the_same_numbers():
    """The runner scores each compressed model with glue, then fidelity: one forward pass of it and (for
    a whole sweep) one of the reference, where there were three; the numbers are the unshared ones."""
    entry = fast_zoo("minilm")
    task = entry.tasks["sst2"]
    adapter = get_adapter("hf_seqcls")
    # copies: other tests' passes of these models are shared too
    reference, model = adapter.load(task.path), copy.deepcopy(zero_reconstruction("hf_seqcls", "minilm", "sst2"))
    ctx = EvalContext("sst2", task.data, adapter.load_processor(task.path), "hf_seqcls", reference=reference)
    passes = {"reference": 0, "model": 0}
    for name, net in (("reference", reference), ("model", model)):
        net.register_forward_hook(lambda *_, name=name: passes.__setitem__(name, passes[name] + 1))
    glue, fidelity = get_evaluator("glue")(progress=False), get_evaluator("fidelity")(progress=False)
    batches = -(-task.data["num_examples"] // 64)
    accuracy = glue.evaluate(model, ctx)["accuracy"]
    kl = fidelity.evaluate(model, ctx)["kl"]
    assert passes == {"reference": batches, "model": batches}  # fidelity reused glue's pass of the model
    fidelity.evaluate(model, ctx)
    assert passes == {"reference": batches, "model": batches}

    # unshared: fresh copies of both models (new weights, so nothing cached applies)
    fresh_ctx = EvalContext("sst2", task.data, ctx.processor, "hf_seqcls", reference=adapter.load(task.path))
    fresh = copy.deepcopy(model)
    assert get_evaluator("glue")(progress=False).evaluate(fresh, fresh_ctx)["accuracy"] == accuracy
    assert get_evaluator("fidelity")(progress=False).evaluate(fresh, fresh_ctx)["kl"] == pytest.approx(kl, rel=1e-6)
