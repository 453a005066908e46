"""GLUE evaluator on the zoo's MiniLM (encoder) and T5 (text-to-text) checkpoints, and its bad inputs."""
from __future__ import annotations

import pytest

from deltadct.adapters import get_adapter
from eval import EvalContext, EvalError, get_evaluator
from eval_zoo import fast_zoo, zero_reconstruction


@pytest.fixture(scope="module")
def minilm():
    return fast_zoo("minilm")


@pytest.fixture(scope="module")
def sst2_model(minilm):
    task = minilm.tasks["sst2"]
    adapter = get_adapter("hf_seqcls")
    return adapter.load(task.path), EvalContext("sst2", task.data, adapter.load_processor(task.path), "hf_seqcls")


def glue(**options):
    return get_evaluator("glue")(progress=False, **options)


@pytest.mark.parametrize("name", ["sst2", "cola", "rte"])
def test_reproduces_the_zoo_scores(minilm, name):
    task = minilm.tasks[name]
    adapter = get_adapter("hf_seqcls")
    ctx = EvalContext(name, task.data, adapter.load_processor(task.path), "hf_seqcls")
    metrics = glue().evaluate(adapter.load(task.path), ctx)
    assert metrics[task.metric] == pytest.approx(task.finetuned_score, abs=1e-9)
    assert metrics["score"] == metrics[task.metric]
    assert metrics["num_examples"] == task.data["num_examples"]
    if name == "sst2":  # what the `zero` method gives (base encoder + fine-tuned head) scores lower
        base = glue().evaluate(zero_reconstruction("hf_seqcls", "minilm", name), ctx)
        assert base["score"] == pytest.approx(task.base_score, abs=1e-9)
        assert base["score"] < metrics["score"]


def test_max_samples_is_a_seeded_subset(sst2_model):
    model, ctx = sst2_model
    a = glue(max_samples=20, batch_size=7).evaluate(model, ctx)
    assert a["num_examples"] == 20
    assert a == glue(max_samples=20, batch_size=20).evaluate(model, ctx)  # batching does not change results


def test_text_to_text_reproduces_the_zoo_scores():
    t5 = fast_zoo("t5")
    adapter = get_adapter("hf_t5")
    for name in ("sst2", "rte"):
        task = t5.tasks[name]
        ctx = EvalContext(name, task.data, adapter.load_processor(task.path), "hf_t5")
        metrics = glue().evaluate(adapter.load(task.path), ctx)
        assert metrics["score"] == pytest.approx(task.finetuned_score, abs=1e-9), name


def test_bad_inputs(sst2_model, tmp_path):
    model, ctx = sst2_model
    with pytest.raises(EvalError, match="unknown GLUE task 'sst3'"):
        glue().evaluate(model, EvalContext("sst3", {"task": "sst3", "data_dir": ctx.data["data_dir"]}, ctx.processor))
    with pytest.raises(EvalError, match=r"no split 'test' in .*sst2 \(expected test.tsv; found \['validation'\]\)"):
        glue(split="test").evaluate(model, ctx)
    with pytest.raises(EvalError, match="needs a tokenizer"):
        glue().evaluate(model, EvalContext("sst2", ctx.data))
    mnli = tmp_path / "mnli"
    mnli.mkdir()
    (mnli / "validation_matched.tsv").write_text("premise\thypothesis\tlabel\nA man sleeps.\tA man is awake.\t"
                                                 "contradiction\n")
    with pytest.raises(EvalError, match="model has 2 output label.* GLUE mnli has 3"):
        glue().evaluate(model, EvalContext("mnli", {"task": "mnli", "data_dir": str(tmp_path)}, ctx.processor))
    (mnli / "validation_matched.tsv").write_text("premise\thypothesis\tlabel\nA.\tB.\tmaybe\n")
    with pytest.raises(EvalError, match="label 'maybe' is not one of"):
        glue().evaluate(model, EvalContext("mnli", {"task": "mnli", "data_dir": str(tmp_path)}, ctx.processor))
    (mnli / "validation_matched.tsv").write_text("sentence\tlabel\nA.\t0\n")
    with pytest.raises(EvalError, match=r"lacks column\(s\) \['premise', 'hypothesis'\]"):
        glue().evaluate(model, EvalContext("mnli", {"task": "mnli", "data_dir": str(tmp_path)}, ctx.processor))
