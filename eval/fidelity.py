"""Fidelity evaluator: how closely the evaluated (compressed) model reproduces the fine-tuned model's
outputs on the task's own validation inputs. No labels are read, so label noise plays no part.

Per example: ``KL(p_ft ‖ p_model)`` of the two output distributions (softmax of the class logits; for
a text-to-text model, of the first answer token, the one that picks the label word) and whether both
put their top-1 on the same class. A one-output regression head (STS-B) has no class distribution: its
output is read as the mean of a unit-variance Gaussian, whose KL is ``(y_ft − y)² / 2``, and top-1
agreement is not defined. ``score`` is the mean KL (0 for the uncompressed delta; lower is better).

Inputs come from the same data spec as the task's evaluator: GLUE TSVs / ``datasets`` (``kind``
``glue`` or ``glue_text2text``) or images (``imagefolder`` / ``datasets``), in the same subset
(``max_samples`` with the same seed picks the same examples as ``glue`` / ``vision``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    EvalContext, EvalOptions, Evaluator, batches, register_evaluator, require_processor, sample_indices,
    shared_outputs,
)
from .errors import EvalError
from .examples import encode_examples
from .glue import default_template, encode_text_pairs, glue_task, load_glue_split, text_batch_key
from .vision import ImageSource, class_logits, image_batch_key, image_mode, load_head, preprocess

IMAGE_KINDS = ("imagefolder", "datasets")
TEXT_KINDS = ("glue", "glue_text2text")


@dataclass
class FidelityOptions(EvalOptions):
    #: a seeded random subset of this many validation inputs (None = all)
    max_samples: int | None = None
    batch_size: int = 64
    #: token limit of text inputs; None = the data spec's ``max_length``, else 128
    max_length: int | None = None
    progress: bool = True


def per_example_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(B,)``: KL(softmax(ref) ‖ softmax(logits)) over the last axis, averaged over any middle axes;
    for one output, the unit-variance Gaussian KL ``(ref − out)² / 2``."""
    ref_logits, logits = ref_logits.double(), logits.double()
    if ref_logits.shape[-1] == 1:
        kl = 0.5 * (ref_logits - logits).squeeze(-1) ** 2
    else:
        ref_logp, logp = F.log_softmax(ref_logits, dim=-1), F.log_softmax(logits, dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)
    return kl.reshape(kl.shape[0], -1).mean(-1)


@register_evaluator
class FidelityEvaluator(Evaluator):
    name = "fidelity"
    Options = FidelityOptions

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        if ctx.reference is None:
            raise EvalError("the fidelity evaluator needs the fine-tuned reference model (ctx.reference)")
        kind = ctx.data.get("kind", "imagefolder")
        if kind in TEXT_KINDS:
            batches = self._text_batches(model, ctx)
        elif kind in IMAGE_KINDS:
            batches = self._image_batches(model, ctx)
        else:
            raise EvalError(f"the fidelity evaluator reads GLUE or image data, not data kind {kind!r} "
                            f"(task {ctx.task!r})")
        kl_parts, agree_parts = [], []
        for ref_logits, logits in batches:
            kl_parts.append(per_example_kl(ref_logits, logits))
            if ref_logits.shape[-1] > 1:
                same = (ref_logits.argmax(-1) == logits.argmax(-1)).float()
                agree_parts.append(same.reshape(len(logits), -1).mean(-1))
        if not kl_parts:
            raise EvalError(f"task {ctx.task!r} has no validation inputs to compare the outputs on")
        kl = torch.cat(kl_parts)
        agree = torch.cat(agree_parts) if agree_parts else None
        self.last_examples = encode_examples("mean:kl", kl=kl.tolist(),
                                             top1_agree=None if agree is None else agree.tolist())
        out = {"kl": float(kl.mean()), "num_examples": float(len(kl))}
        if agree is not None:
            out["top1_agreement"] = float(agree.mean())
        out["score"] = out["kl"]
        return out

    def _chunks(self, items: list, desc: str) -> Iterator[list]:
        return batches(items, self.options.batch_size, desc=desc, progress=self.options.progress)

    def _text_batches(self, model: nn.Module, ctx: EvalContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        task = glue_task(ctx.data.get("task", ctx.task))
        tokenizer = require_processor(ctx)
        split, data_dir = ctx.data.get("split") or task.split, ctx.data.get("data_dir")
        texts, _ = load_glue_split(task, split, data_dir)
        keep = sample_indices(len(texts), self.options.max_samples, self.options.seed).tolist()
        max_length = self.options.max_length or ctx.data.get("max_length") or 128
        adapter = ctx.adapter_for(model)
        template = ctx.data.get("input_template") or default_template(task)
        device = next(model.parameters()).device
        for indices in self._chunks(keep, f"fidelity {task.name}"):
            rows = [texts[i] for i in indices]
            if adapter.answers_by == "generate":
                prompts = [template.format(**dict(zip(task.text_columns, t, strict=True))) for t in rows]
                enc = tokenizer(prompts, truncation=True, max_length=max_length, padding="longest",
                                return_tensors="pt").to(device)
                start = torch.full((len(rows), 1), model.config.decoder_start_token_id, device=device)
                enc["decoder_input_ids"] = start  # the first answer token's distribution
                yield ctx.reference(**enc).logits, model(**enc).logits
                continue
            # the same batches as the glue evaluator's with the same options: their logits are shared
            key = text_batch_key(task.name, split, data_dir, max_length, indices)
            encoded = functools.cache(lambda rows=rows: encode_text_pairs(tokenizer, rows, max_length, device))
            yield (shared_outputs(ctx.reference, key, lambda: adapter.logits(ctx.reference, encoded())),
                   shared_outputs(model, key, lambda: adapter.logits(model, encoded())))

    def _image_batches(self, model: nn.Module, ctx: EvalContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        processor = require_processor(ctx, "an image transform")
        adapter = ctx.adapter_for(model)
        mode = image_mode(ctx, adapter, model)
        source = ImageSource(ctx.data, mode)
        head = load_head(ctx.data["head"]) if ctx.data.get("head") else None
        device = next(model.parameters()).device
        if head is not None:
            head = F.normalize(head.to(device), dim=-1)
        indices = sample_indices(len(source), self.options.max_samples, self.options.seed).tolist()
        for batch in self._chunks(indices, f"fidelity {ctx.task}"):
            # the vision evaluator's batches with the same options: their logits are shared
            key = image_batch_key(ctx, mode, batch)
            pixels = functools.cache(
                lambda batch=batch: preprocess(processor, [source.image(i) for i in batch]).to(device))
            yield tuple(shared_outputs(net, key, lambda net=net: class_logits(adapter, net, pixels(), head, ctx))
                        for net in (ctx.reference, model))
