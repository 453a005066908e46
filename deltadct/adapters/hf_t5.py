"""Encoder-decoder text-to-text models (T5, FLAN-T5, …) as ``AutoModelForSeq2SeqLM``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import register_adapter
from .hf import HuggingFaceAdapter, model_device, random_token_ids, tokenized


@register_adapter
class T5Adapter(HuggingFaceAdapter):
    name = "hf_t5"
    modality = "text"
    auto_class = "AutoModelForSeq2SeqLM"
    model_names = "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"
    answers_by = "generate"

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        # Random encoder input and a random teacher-forced decoder prefix: logits at every decoder step.
        ids = random_token_ids(processor, model, num=num, length=32, seed=seed)
        decoder = random_token_ids(processor, model, num=num, length=8, seed=seed + 1)
        device = model_device(model)
        return {"input_ids": ids.to(device), "decoder_input_ids": decoder.to(device)}

    def generate(self, model: nn.Module, inputs, *, max_new_tokens: int) -> torch.Tensor:
        # an encoder-decoder's output is the answer alone (after the decoder start token)
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)

    def calibration_inputs(self, model: nn.Module, processor: Any, samples: list, *,
                           seq_len: int) -> list[dict[str, torch.Tensor]]:
        # the encoder reads the sample and the decoder is teacher-forced on it (shifted right behind the
        # start token), so the decoder's layers see as many positions as the encoder's
        return [{**inputs, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=inputs["input_ids"])}
                for inputs in tokenized(processor, model, samples, seq_len)]
