"""Reconstruction evaluator (data-free): how far the evaluated model is from the fine-tuned reference.

Parameter level, over the weight matrices (parameters with two or more dimensions, the ones a
compression policy may touch): per-tensor relative Frobenius error ``‖W − W_ref‖ / ‖W_ref‖`` and
cosine similarity, summarised as mean / max error, mean cosine, and the global relative error over
all of them together (``score``, lower is better). :meth:`ReconstructionEvaluator.layer_errors`
gives the per-tensor table. Output level, when the context has an adapter that can build example
inputs: ``KL(reference ‖ model)`` of the output distributions on a few fixed random inputs (token ids
from the vocabulary, or images of the model's input size), averaged over examples and positions,
and the share of positions where both agree on the top-1 output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltadct.adapters import AdapterError, ModelAdapter

from .base import EvalContext, EvalOptions, Evaluator, register_evaluator
from .errors import EvalError


def _weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if v.ndim >= 2 and v.is_floating_point()}


@torch.no_grad()
def layer_errors(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, float]]:
    """``{name: {"rel_error", "cosine", "numel"}}`` for every weight matrix the two models share.

    Raises EvalError when they share none or a shared name has different shapes (not the same model).
    """
    ours, ref = _weight_matrices(model), _weight_matrices(reference)
    shared = [k for k in ref if k in ours]
    if not shared:
        raise EvalError("the model and its reference share no weight matrices by name; not the same architecture")
    table = {}
    for name in shared:
        # float64: a cosine of identical float32 tensors must come out as 1, not 1 + rounding
        a, b = ours[name].double().flatten(), ref[name].to(ours[name].device).double().flatten()
        if a.shape != b.shape:
            raise EvalError(f"weight {name!r} has {a.numel()} values in the model but {b.numel()} in the reference")
        diff, norm_ref, norm_ours = float(torch.linalg.vector_norm(a - b)), float(b.norm()), float(a.norm())
        rel = diff / norm_ref if norm_ref > 0 else (0.0 if diff == 0 else float("inf"))
        cos = float(a @ b) / (norm_ours * norm_ref) if norm_ours > 0 and norm_ref > 0 else float(diff == 0)
        table[name] = {"rel_error": rel, "cosine": cos, "numel": float(a.numel()), "sq_diff": diff ** 2,
                       "sq_ref": norm_ref ** 2}
    return table


@torch.no_grad()
def output_divergence(model: nn.Module, reference: nn.Module, adapter: ModelAdapter, processor,
                      num_inputs: int, seed: int) -> dict[str, float]:
    """KL(reference ‖ model) and top-1 agreement on ``num_inputs`` fixed example inputs; {} when the
    family has no example inputs (state-dict-only families)."""
    try:
        inputs = adapter.example_inputs(reference, processor, num=num_inputs, seed=seed)
    except AdapterError:
        return {}
    ref_logits = adapter.logits(reference, inputs).float()
    our_logits = adapter.logits(model, {k: v.to(next(model.parameters()).device) for k, v in inputs.items()})
    ref_logp = F.log_softmax(ref_logits, dim=-1)
    our_logp = F.log_softmax(our_logits.float().to(ref_logits.device), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - our_logp)).sum(-1)
    agree = (ref_logp.argmax(-1) == our_logp.argmax(-1)).float()
    return {"logit_kl": float(kl.mean().clamp_min(0.0)), "top1_agreement": float(agree.mean())}


@dataclass
class ReconstructionOptions(EvalOptions):
    #: example inputs for the output KL (0 = parameters only)
    num_inputs: int = 4


@register_evaluator
class ReconstructionEvaluator(Evaluator):
    name = "reconstruction"
    Options = ReconstructionOptions

    def __init__(self, **options):
        super().__init__(**options)
        #: per-tensor errors of the last ``evaluate`` call (for a W&B table)
        self.last_layer_errors: dict[str, dict[str, float]] = {}

    layer_errors = staticmethod(layer_errors)

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        if ctx.reference is None:
            raise EvalError("the reconstruction evaluator needs the fine-tuned reference model (ctx.reference)")
        table = layer_errors(model, ctx.reference)
        self.last_layer_errors = table
        rel = [row["rel_error"] for row in table.values()]
        sq_diff, sq_ref = sum(r["sq_diff"] for r in table.values()), sum(r["sq_ref"] for r in table.values())
        global_rel = (sq_diff / sq_ref) ** 0.5 if sq_ref > 0 else 0.0
        out = {"rel_error": global_rel, "rel_error_mean": sum(rel) / len(rel), "rel_error_max": max(rel),
               "cosine_mean": sum(r["cosine"] for r in table.values()) / len(table),
               "num_tensors": float(len(table))}
        if ctx.adapter is not None and self.options.num_inputs > 0:
            out.update(output_divergence(model, ctx.reference, ctx.adapter, ctx.processor,
                                         self.options.num_inputs, self.options.seed))
        out["score"] = global_rel
        return out
