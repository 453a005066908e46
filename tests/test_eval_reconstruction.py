"""Reconstruction evaluator: zero against itself, positive against the `zero` reconstruction."""
from __future__ import annotations

import math

import pytest
import torch

from deltadct.adapters import get_adapter
from eval import EvalContext, EvalError, get_evaluator
from eval_zoo import fast_zoo, zero_reconstruction


@pytest.mark.parametrize("family,adapter_name,task_name", [("vit", "timm_vit", "parity"),
                                                           ("minilm", "hf_seqcls", "sst2")])
def test_self_is_exact_and_zero_is_not(family, adapter_name, task_name):
    entry = fast_zoo(family)
    task = entry.tasks[task_name]
    adapter = get_adapter(adapter_name)
    reference = adapter.load(task.path)
    ctx = EvalContext(task_name, task.data, adapter.load_processor(task.path), adapter_name, reference=reference)
    evaluator = get_evaluator("reconstruction")()

    same = evaluator.evaluate(adapter.load(task.path), ctx)
    assert same["rel_error"] == same["rel_error_max"] == 0.0 and same["score"] == 0.0
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    assert same["logit_kl"] == 0.0 and same["top1_agreement"] == 1.0

    zero = zero_reconstruction(adapter_name, family, task_name)
    out = evaluator.evaluate(zero, ctx)
    assert out["rel_error"] > 0 and out["logit_kl"] > 0 and out["cosine_mean"] < 1
    # per-layer table agrees with a direct computation on one compressed matrix
    table = evaluator.last_layer_errors
    name = max(table, key=lambda k: table[k]["rel_error"])
    ours, ref = dict(zero.named_parameters())[name].detach(), dict(reference.named_parameters())[name].detach()
    assert table[name]["rel_error"] == pytest.approx(float((ours - ref).norm() / ref.norm()), rel=1e-5)
    assert out["rel_error_max"] == table[name]["rel_error"]
    assert table[next(k for k in table if "head" in k or "classifier" in k)]["rel_error"] == 0.0  # kept heads


def test_kl_by_hand_on_tiny_logits():
    from eval import reconstruction

    ref_logits, our_logits = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])

    class FakeAdapter:
        def example_inputs(self, model, processor, *, num, seed):
            return {"which": torch.zeros(1)}

        def logits(self, model, inputs):
            return model.fixed

    ref, ours = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    ref.fixed, ours.fixed = ref_logits, our_logits
    p = [math.exp(v) / sum(math.exp(w) for w in (2.0, 0.0, -1.0)) for v in (2.0, 0.0, -1.0)]
    q = [math.exp(v) / sum(math.exp(w) for w in (0.0, 1.0, 0.5)) for v in (0.0, 1.0, 0.5)]
    expected = sum(p[i] * math.log(p[i] / q[i]) for i in range(3))
    out = reconstruction.output_divergence(ours, ref, FakeAdapter(), None, 1, 0)
    assert out["logit_kl"] == pytest.approx(expected, rel=1e-5) and out["top1_agreement"] == 0.0


def test_needs_a_reference():
    with pytest.raises(EvalError, match="needs the fine-tuned reference model"):
        get_evaluator("reconstruction")().evaluate(torch.nn.Linear(2, 2), EvalContext("x", {}))
    with pytest.raises(EvalError, match="share no weight matrices"):
        get_evaluator("reconstruction")().evaluate(torch.nn.Linear(2, 2), EvalContext(
            "x", {}, reference=torch.nn.Sequential(torch.nn.Linear(2, 2))))
