"""Decoder-only language models (GPT-2, Llama, Mistral, …) as ``AutoModelForCausalLM``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import register_adapter
from .hf import HuggingFaceAdapter, model_device, random_token_ids, tokenized


@register_adapter
class CausalLMAdapter(HuggingFaceAdapter):
    name = "hf_causal_lm"
    modality = "text"
    auto_class = "AutoModelForCausalLM"
    model_names = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        ids = random_token_ids(processor, model, num=num, length=32, seed=seed)
        return {"input_ids": ids.to(model_device(model))}

    def calibration_inputs(self, model: nn.Module, processor: Any, samples: list, *,
                           seq_len: int) -> list[dict[str, torch.Tensor]]:
        return tokenized(processor, model, samples, seq_len)
