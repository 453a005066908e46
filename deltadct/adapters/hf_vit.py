"""Hugging Face image classifiers (ViT, DeiT, BEiT, …) as ``AutoModelForImageClassification``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdapterError, checkpoint_path, register_adapter
from .hf import HuggingFaceAdapter, model_device, quiet_transformers


@register_adapter
class HFImageClassificationAdapter(HuggingFaceAdapter):
    name = "hf_vit"
    modality = "image"
    auto_class = "AutoModelForImageClassification"
    model_names = "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"
    answers_by = "classify"
    # A fine-tuned classifier has a new head (other classes than the pre-training one); base-only tensors
    # (the pooler of an ``AutoModel`` base, pre-training heads) have no place in the result.
    policy_defaults = {"extra_keys": "keep", "missing_keys": "ignore"}

    def load_processor(self, path) -> Any:
        from transformers import AutoImageProcessor

        try:
            with quiet_transformers():
                return AutoImageProcessor.from_pretrained(checkpoint_path(path))
        except (OSError, ValueError, KeyError):  # no preprocessor_config.json: the evaluator says so
            return None

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        size = model.config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(num, model.config.num_channels, height, width, generator=generator)
        return self.pixel_inputs(pixels.to(model_device(model)))

    def handles(self, model: nn.Module) -> bool:
        # CLIP-like models with an image tower are scored like image classifiers (zero-shot heads)
        return super().handles(model) or hasattr(model, "get_image_features")

    def input_channels(self, model: nn.Module) -> int:
        config = getattr(model.config, "vision_config", model.config)
        return config.num_channels

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixels}

    def image_features(self, model: nn.Module, pixels: torch.Tensor, dim: int) -> torch.Tensor:
        """CLIP's ``get_image_features`` (the projection into the text space), else the pooled output."""
        if hasattr(model, "get_image_features"):
            return model.get_image_features(pixel_values=pixels)
        out = model.base_model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def calibration_inputs(self, model: nn.Module, processor: Any, samples: list, *,
                           seq_len: int) -> list[dict[str, torch.Tensor]]:
        if processor is None:
            raise AdapterError("calibration needs the image processor saved with the checkpoint; none was found")
        device = model_device(model)
        return [{"pixel_values": processor([image], return_tensors="pt")["pixel_values"].to(device)}
                for image in samples]
