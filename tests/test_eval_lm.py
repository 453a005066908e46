"""lm-eval and perplexity evaluators on the zoo's tiny GPT-2 (in memory, local lm-eval task)."""
from __future__ import annotations

import math

import pytest
import torch

from deltadct.adapters import get_adapter
from eval import EvalContext, EvalError, get_evaluator
from eval_zoo import fast_zoo


@pytest.fixture(scope="module")
def sst2():
    task = fast_zoo("gpt").tasks["sst2"]
    adapter = get_adapter("hf_causal_lm")
    return adapter.load(task.path), EvalContext("sst2", task.data, adapter.load_processor(task.path),
                                                "hf_causal_lm"), task


def test_lm_eval_local_task_reproduces_the_zoo_score(sst2):
    model, ctx, task = sst2
    metrics = get_evaluator("lm_eval")(batch_size=16).evaluate(model, ctx)
    name = task.data["task"]
    assert metrics[f"{name}/acc"] == pytest.approx(task.finetuned_score, abs=1e-9)
    assert metrics["score"] == metrics[f"{name}/acc"]
    # a headline metric the task lacks falls back to the task's first metric (here its only one, acc)
    limited = get_evaluator("lm_eval")(limit=4, metric="f1").evaluate(model, ctx)
    assert limited["score"] == limited[f"{name}/acc"] and limited["score"] in (0, 0.25, 0.5, 0.75, 1)


def test_lm_eval_bad_inputs(sst2, tmp_path):
    model, ctx, _ = sst2
    with pytest.raises(EvalError, match=r"unknown lm-eval task\(s\) \['zoo_nope'\]"):
        get_evaluator("lm_eval")(tasks=["zoo_nope"]).evaluate(model, ctx)
    with pytest.raises(EvalError, match="include_path .*missing is not a folder"):
        get_evaluator("lm_eval")(include_path=str(tmp_path / "missing")).evaluate(model, ctx)
    with pytest.raises(EvalError, match="needs a tokenizer"):
        get_evaluator("lm_eval")().evaluate(model, EvalContext("sst2", ctx.data))


def test_perplexity_matches_the_model_loss(sst2, tmp_path):
    model, ctx, _ = sst2
    text = "the movie was a delight from start to finish . " * 3 + "a dull , lifeless film ."
    (tmp_path / "text.txt").write_text(text)
    ids = ctx.processor(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)  # transformers' own shifted mean NLL
    ctx = EvalContext("text", {"data_file": tmp_path / "text.txt"}, ctx.processor)
    whole = get_evaluator("perplexity")(progress=False).evaluate(model, ctx)
    assert whole["tokens"] == ids.shape[1] - 1
    assert whole["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4) and whole["score"] == whole["perplexity"]
    strided = get_evaluator("perplexity")(progress=False, max_length=12, stride=5).evaluate(model, ctx)
    assert strided["tokens"] == ids.shape[1] - 1  # every token scored exactly once
    assert math.isfinite(strided["perplexity"]) and strided["perplexity"] > 1
    with pytest.raises(EvalError, match="needs a text file"):
        get_evaluator("perplexity")().evaluate(model, EvalContext("text", {"data_file": tmp_path / "no.txt"},
                                                                  ctx.processor))


def test_code_executing_tasks_need_explicit_consent(sst2, tmp_path):
    """A task marked ``unsafe_code`` (as lm-eval marks humaneval and mbpp) is refused with one clear
    error unless ``allow_code_execution``, which also sets HF_ALLOW_CODE_EVAL only while it runs."""
    import os

    model, ctx, task = sst2
    name = task.data["task"]
    source = open(os.path.join(task.data["include_path"], f"{name}.yaml"), encoding="utf-8").read()
    (tmp_path / "unsafe.yaml").write_text(source.replace(f"task: {name}", "task: zoo_unsafe")
                                          + "unsafe_code: true\n")
    options = dict(tasks=["zoo_unsafe"], include_path=str(tmp_path), limit=4)
    with pytest.raises(EvalError, match=r"execute model-generated code; set eval.lm_eval.allow_code_execution"):
        get_evaluator("lm_eval")(**options).evaluate(model, ctx)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
    metrics = get_evaluator("lm_eval")(allow_code_execution=True, **options).evaluate(model, ctx)
    assert metrics["score"] == metrics["zoo_unsafe/acc"] and metrics["score"] in (0, 0.25, 0.5, 0.75, 1)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
