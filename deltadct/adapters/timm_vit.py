"""timm image models (ViT and friends) saved in timm's hub format: ``config.json`` + ``model.safetensors``.

Loaded the normal timm way, ``timm.create_model("local-dir:<dir>", pretrained=True)``; the processor is
timm's eval transform built from the ``pretrained_cfg`` stored in ``config.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .base import ModelAdapter, PathLike, check_state_dict_fits, checkpoint_path, register_adapter


def _create(path: Path, pretrained: bool) -> nn.Module:
    import timm

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a timm checkpoint dir (no config.json)")
    try:
        return timm.create_model(f"local-dir:{path}", pretrained=pretrained)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} does not load as a timm model: {str(err).splitlines()[0]}") from None


@register_adapter
class TimmAdapter(ModelAdapter):
    name = "timm_vit"
    modality = "image"
    answers_by = "classify"
    # A fine-tuned classifier has a new head (another number of classes than the base).
    policy_defaults = {"extra_keys": "keep"}

    def load(self, path: PathLike, *, device: str = "cpu") -> nn.Module:
        return _create(checkpoint_path(path), pretrained=True).to(device).eval()

    def load_processor(self, path: PathLike) -> Any:
        import timm.data

        with torch.device("meta"):  # only the pretrained_cfg timm parses from config.json is needed
            model = _create(checkpoint_path(path), pretrained=False)
        return timm.data.create_transform(**timm.data.resolve_data_config(model=model))

    def load_with_state_dict(self, path: PathLike, state_dict: Mapping[str, torch.Tensor], *,
                             device: str = "cpu") -> nn.Module:
        path = checkpoint_path(path)
        model = _create(path, pretrained=False)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_state_dict_fits(expected, state_dict, where=path)
        model.load_state_dict(dict(state_dict), strict=True)
        return model.to(device).eval()

    def save(self, model: nn.Module, out_dir: PathLike) -> Path:
        from timm.models import save_for_hf

        out_dir = Path(out_dir)
        save_for_hf(model, str(out_dir), safe_serialization=True)  # records the model's own input config
        return out_dir

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        from timm.models import get_model_input_config

        channels, height, width = get_model_input_config(model)["input_size"]
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(num, channels, height, width, generator=generator)
        return self.pixel_inputs(pixels.to(next(model.parameters()).device))

    def calibration_inputs(self, model: nn.Module, processor: Any, samples: list, *,
                           seq_len: int) -> list[dict[str, torch.Tensor]]:
        device = next(model.parameters()).device
        return [{"x": processor(image).unsqueeze(0).to(device)} for image in samples]

    def logits(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(inputs["x"])

    def handles(self, model: nn.Module) -> bool:
        # timm models carry the pretrained_cfg they were created with and split forward into features + head
        return hasattr(model, "pretrained_cfg") and hasattr(model, "forward_head")

    def num_classes(self, model: nn.Module) -> int:
        return model.num_classes

    def input_channels(self, model: nn.Module) -> int:
        # the model's own first layer, not pretrained_cfg: that stays the source checkpoint's (often 3)
        from timm.models import get_model_input_config

        return get_model_input_config(model)["input_size"][0]

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": pixels}

    def image_features(self, model: nn.Module, pixels: torch.Tensor, dim: int) -> torch.Tensor:
        """The pooled features before the head if they are ``dim`` wide, else the head's output when that
        is (timm's CLIP image towers, e.g. ``vit_base_patch32_clip_224.openai``, keep CLIP's image projection
        as their ``head``: 768 → 512, the width of the text embeddings)."""
        pooled = model.forward_head(model.forward_features(pixels), pre_logits=True)
        return pooled if pooled.shape[-1] == dim or model.num_classes != dim else model.get_classifier()(pooled)
