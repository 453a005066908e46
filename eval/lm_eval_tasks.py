"""lm-eval evaluator: EleutherAI's lm-evaluation-harness on the in-memory model (no re-save).

The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)``; tasks come from the options
(``tasks``), else the data spec (``task``/``tasks``), else the context's task name. ``include_path``
(options or data spec) adds local YAML task folders, e.g. the one the zoo's gpt family ships.
Metrics come back flat as ``<task>/<metric>`` (``<task>/<metric>_<filter>`` for filters other than
``none``); ``score`` is the mean over the requested tasks of their ``metric`` (option, else the data
spec's ``lm_eval_metric``, else ``acc``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .base import EvalContext, EvalOptions, Evaluator, register_evaluator, require_processor
from .errors import EvalError


def flatten_results(results: dict) -> dict[str, float]:
    """``{"task": {"acc,none": 0.5, "alias": …}}`` -> ``{"task/acc": 0.5}`` (numbers only)."""
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            flat[f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}_{filter_name}"] = float(value)
    return flat


def headline(flat: dict[str, float], tasks: list[str], metric: str) -> float:
    """Mean over ``tasks`` of their ``metric`` (a task without it contributes its first metric)."""
    values = []
    for task in tasks:
        own = {k: v for k, v in flat.items() if k.startswith(f"{task}/") and "_stderr" not in k}
        if f"{task}/{metric}" in own:
            values.append(own[f"{task}/{metric}"])
        elif own:
            values.append(next(iter(own.values())))
    return sum(values) / len(values) if values else float("nan")


@contextlib.contextmanager
def code_execution(allowed: bool):
    """HF_ALLOW_CODE_EVAL=1 for the duration when ``allowed`` (the code_eval metric checks it)."""
    if not allowed:
        yield
        return
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_ALLOW_CODE_EVAL"]
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


@dataclass
class LMEvalOptions(EvalOptions):
    #: lm-eval task names; empty = the data spec's ``task``/``tasks``, else the context's task
    tasks: tuple[str, ...] = ()
    #: examples per task (an int count, or a fraction < 1); None = all
    limit: float | None = None
    #: few-shot examples; None = each task's default
    num_fewshot: int | None = None
    batch_size: int = 8
    #: extra folder of lm-eval YAML tasks (added to the data spec's ``include_path``)
    include_path: str | None = None
    #: the metric averaged into ``score``; None = the data spec's ``lm_eval_metric``, else ``acc``
    metric: str | None = None
    #: bootstrap resamples for stderr (0 = no stderr; faster)
    bootstrap_iters: int = 0
    #: run tasks that execute model-generated code (HumanEval, MBPP): lm-eval refuses them unless
    #: confirmed, and its code metric unless HF_ALLOW_CODE_EVAL=1. Only in a sandbox.
    allow_code_execution: bool = False


@register_evaluator
class LMEvalEvaluator(Evaluator):
    name = "lm_eval"
    Options = LMEvalOptions

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        opts = self.options
        tokenizer = require_processor(ctx)
        tasks = list(opts.tasks or ctx.data.get("tasks") or [ctx.data.get("task", ctx.task)])
        include = [str(p) for p in (ctx.data.get("include_path"), opts.include_path) if p]
        for path in include:
            if not Path(path).is_dir():
                raise EvalError(f"lm-eval include_path {path} is not a folder")
        # Indexing lm-eval's thousands of built-in task YAMLs takes seconds: skip it when local tasks suffice.
        manager = TaskManager(include_path=include, include_defaults=False) if include else None
        if manager is None or any(t not in manager.all_tasks for t in tasks):
            manager = TaskManager(include_path=include or None)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise EvalError(f"unknown lm-eval task(s) {unknown}" + (f" (searched lm-eval's tasks and {include})"
                                                                    if include else " (no include_path given)"))
        limit = opts.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-request INFO chatter
        with code_execution(opts.allow_code_execution):
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=tasks, num_fewshot=opts.num_fewshot, limit=limit, task_manager=manager,
                    log_samples=False, bootstrap_iters=opts.bootstrap_iters, random_seed=opts.seed,
                    numpy_random_seed=opts.seed, torch_random_seed=opts.seed, fewshot_random_seed=opts.seed,
                    confirm_run_unsafe_code=opts.allow_code_execution)
            except ValueError as exc:
                if "marked as unsafe" not in str(exc):
                    raise
                raise EvalError(f"lm-eval task(s) {tasks} execute model-generated code; set "
                                "eval.lm_eval.allow_code_execution=true to run them (in a sandbox)") from None
        flat = flatten_results(out["results"])
        metric = opts.metric or ctx.data.get("lm_eval_metric") or "acc"
        return {**flat, "score": headline(flat, tasks, metric)}
