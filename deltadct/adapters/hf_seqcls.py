"""Encoder classifiers (BERT, RoBERTa, MiniLM, …) as ``AutoModelForSequenceClassification``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import register_adapter
from .hf import HuggingFaceAdapter, model_device, random_token_ids, tokenized


@register_adapter
class SequenceClassificationAdapter(HuggingFaceAdapter):
    name = "hf_seqcls"
    modality = "text"
    auto_class = "AutoModelForSequenceClassification"
    model_names = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    answers_by = "classify"
    # The classification head is new (absent from the base encoder): store it in full. Base-only tensors
    # (pre-training heads, the pooler of some bases, legacy position_ids buffers) have no place in the result.
    policy_defaults = {"extra_keys": "keep", "missing_keys": "ignore"}

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        ids = random_token_ids(processor, model, num=num, length=32, seed=seed)
        return {"input_ids": ids.to(model_device(model))}

    def calibration_inputs(self, model: nn.Module, processor: Any, samples: list, *,
                           seq_len: int) -> list[dict[str, torch.Tensor]]:
        return tokenized(processor, model, samples, seq_len)
