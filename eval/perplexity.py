"""Perplexity of a causal LM on a local text file, with strided (sliding) windows.

The text is tokenized once; windows of ``max_length`` tokens advance by ``stride``, and each window
scores only the tokens not scored by the previous one, each with up to ``max_length - stride``
tokens of left context. ``score`` is the perplexity (lower is better).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .base import EvalContext, EvalOptions, Evaluator, register_evaluator, require_processor
from .errors import EvalError


@dataclass
class PerplexityOptions(EvalOptions):
    #: text file; None = the data spec's ``data_file``
    data_file: str | None = None
    #: window length in tokens; None = the model's context length, at most 512
    max_length: int | None = None
    #: window step in tokens; None = half the window
    stride: int | None = None
    #: score at most this many tokens of the file (None = all)
    max_tokens: int | None = 4096
    progress: bool = True


@register_evaluator
class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    Options = PerplexityOptions

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        opts = self.options
        tokenizer = require_processor(ctx)
        data_file = opts.data_file or ctx.data.get("data_file")
        if not data_file or not Path(data_file).is_file():
            raise EvalError(f"perplexity of task {ctx.task!r} needs a text file (data_file); got {data_file!r}")
        ids = tokenizer(Path(data_file).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        if opts.max_tokens is not None:
            ids = ids[:opts.max_tokens]
        if len(ids) < 2:
            raise EvalError(f"{data_file} has fewer than 2 tokens")
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 512)
        window = min(opts.max_length or min(context, 512), context)
        stride = opts.stride or max(1, window // 2)
        device = next(model.parameters()).device
        nll, scored, end_prev = 0.0, 0, 0
        starts = range(0, len(ids) - 1, stride)
        for start in tqdm(starts, desc=f"perplexity {ctx.task}", unit="window", disable=not opts.progress,
                          leave=False):
            end = min(start + window, len(ids))
            chunk = ids[start:end].unsqueeze(0).to(device)
            logits = model(input_ids=chunk).logits[0, :-1].float()
            targets = chunk[0, 1:]
            new = end - max(end_prev, start + 1)  # tokens this window scores for the first time
            nll += float(F.cross_entropy(logits[-new:], targets[-new:], reduction="sum"))
            scored += new
            end_prev = end
            if end == len(ids):
                break
        mean = nll / scored
        return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": float(scored),
                "score": math.exp(mean)}
