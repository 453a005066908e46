"""Vision evaluator: top-1 accuracy of timm or Hugging Face image classifiers.

Data spec ``{"kind": "imagefolder", "root": ...}``: ``root/<class>/<image>``, classes in sorted folder
order (torchvision ``ImageFolder``), or ``{"kind": "datasets", "path": ..., "name": ..., "split": ...,
"image_column": "image", "label_column": "label"}`` for ``datasets.load_dataset``. With ``"head": <file>``
(a ``[num_classes, dim]`` tensor of class embeddings, e.g. CLIP text embeddings, in a ``.safetensors`` or
``.pt`` file) the model's classifier is bypassed: logits = normalised image embedding @ normalised head.T
(CLIP-style zero-shot head; the embedding is the pooled features, or the model's projection head's
output where that has the head's width: the adapter's ``image_features``). What differs between model
families (classes, channels, inputs, embeddings) comes from the context's adapter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    EvalContext, EvalOptions, Evaluator, batches, register_evaluator, require_processor, sample_indices,
    shared_outputs,
)
from .errors import EvalError
from .examples import encode_examples


def load_head(path: str | Path) -> torch.Tensor:
    """The class-embedding matrix ``[num_classes, dim]`` stored in ``path`` (the file's only tensor, or the
    one named ``head``)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"zero-shot head file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        head = tensors.get("head", next(iter(tensors.values())) if len(tensors) == 1 else None)
    else:
        head = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(head, torch.Tensor) or head.ndim != 2:
        raise EvalError(f"{path} must hold one 2-D tensor [num_classes, dim] (or one named 'head')")
    return head.float()


class ImageSource:
    """Images (PIL) and integer labels of one evaluation set, with its class names."""

    def __init__(self, data: dict, mode: str):
        self.mode = mode
        kind = data.get("kind", "imagefolder")
        if kind == "imagefolder":
            self._from_folder(Path(data["root"]))
        elif kind == "datasets":
            self._from_datasets(data)
        else:
            raise EvalError(f"vision data kind {kind!r} is not supported; use 'imagefolder' or 'datasets'")

    def _from_folder(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        if not root.is_dir():
            raise EvalError(f"image folder {root} does not exist")
        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as err:
            raise EvalError(f"image folder {root}: {str(err).splitlines()[0]}") from None
        self.classes = list(folder.classes)
        self.paths, self.labels = [p for p, _ in folder.samples], [y for _, y in folder.samples]
        self._rows = None

    def _from_datasets(self, data: dict) -> None:
        import datasets

        try:
            ds = datasets.load_dataset(data["path"], data.get("name"), split=data.get("split", "validation"))
        except Exception as err:  # noqa: BLE001 - hub/cache failures: the data is just not there
            raise EvalError(f"datasets.load_dataset({data['path']!r}) failed: {str(err).splitlines()[0]}") from None
        label_column = data.get("label_column", "label")
        feature = ds.features.get(label_column)
        self.classes = list(getattr(feature, "names", None) or sorted(set(ds[label_column])))
        self.labels = list(ds[label_column])
        self._rows, self._image_column = ds, data.get("image_column", "image")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):
        from PIL import Image

        if self._rows is None:
            with Image.open(self.paths[i]) as img:
                return img.convert(self.mode)
        return self._rows[i][self._image_column].convert(self.mode)


def class_logits(adapter, model: nn.Module, pixels: torch.Tensor, head: torch.Tensor | None,
                 ctx: EvalContext) -> torch.Tensor:
    """(batch, classes): the classifier's logits, or with a zero-shot ``head`` (unit rows) the cosine
    similarity of the image features to each class embedding."""
    if head is None:
        return adapter.logits(model, adapter.pixel_inputs(pixels))
    features = adapter.image_features(model, pixels, head.shape[1])
    if features.shape[-1] != head.shape[1]:
        raise EvalError(f"image features have dim {features.shape[-1]} but the zero-shot head "
                        f"{ctx.data['head']} has dim {head.shape[1]}")
    return F.normalize(features, dim=-1) @ head.T


def image_mode(ctx: EvalContext, adapter, model: nn.Module) -> str:
    """The PIL mode images are read in: the data spec's ``image_mode``, else what the model takes."""
    return ctx.data.get("image_mode") or ("L" if adapter.input_channels(model) == 1 else "RGB")


def image_batch_key(ctx: EvalContext, mode: str, indices) -> tuple:
    """What names one preprocessed batch of a task's images for :func:`~eval.base.shared_outputs`."""
    return ("image", json.dumps(ctx.data, sort_keys=True, default=str), mode, repr(ctx.processor),
            tuple(int(i) for i in indices))


def preprocess(processor: Any, images: list) -> torch.Tensor:
    """A batch of pixel tensors from a timm/torchvision transform or a Hugging Face image processor."""
    if hasattr(processor, "preprocess"):  # transformers BaseImageProcessor
        return processor(images, return_tensors="pt")["pixel_values"]
    return torch.stack([processor(img) for img in images])


@dataclass
class VisionOptions(EvalOptions):
    #: evaluate a seeded random subset of this many images (None = all)
    max_samples: int | None = None
    batch_size: int = 256
    progress: bool = True


@register_evaluator
class VisionEvaluator(Evaluator):
    name = "vision"
    Options = VisionOptions

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        processor = require_processor(ctx, "an image transform")
        adapter = ctx.adapter_for(model)
        mode = image_mode(ctx, adapter, model)
        source = ImageSource(ctx.data, mode)
        head = load_head(ctx.data["head"]) if ctx.data.get("head") else None
        num_classes = head.shape[0] if head is not None else adapter.num_classes(model)
        if num_classes != len(source.classes):
            raise EvalError(f"the model predicts {num_classes} classes but the data of task {ctx.task!r} has "
                            f"{len(source.classes)} ({', '.join(map(str, source.classes[:10]))}"
                            f"{', …' if len(source.classes) > 10 else ''}); wrong checkpoint for this task?")
        device = next(model.parameters()).device
        if head is not None:
            head = F.normalize(head.to(device), dim=-1)
        indices = sample_indices(len(source), self.options.max_samples, self.options.seed).tolist()
        labels_seen: list[int] = []
        predictions: list[int] = []
        for batch in batches(indices, self.options.batch_size, desc=f"vision {ctx.task}",
                             progress=self.options.progress):
            logits = shared_outputs(model, image_batch_key(ctx, mode, batch), lambda batch=batch: class_logits(
                adapter, model, preprocess(processor, [source.image(i) for i in batch]).to(device), head, ctx))
            labels_seen.extend(source.labels[i] for i in batch)
            predictions.extend(logits.argmax(-1).tolist())
        correct = sum(p == y for p, y in zip(predictions, labels_seen, strict=True))
        accuracy = correct / len(indices) if indices else float("nan")
        self.last_examples = encode_examples("accuracy", labels=labels_seen, predictions=predictions,
                                             index=indices if len(indices) < len(source) else None)
        return {"accuracy": accuracy, "score": accuracy, "num_examples": float(len(indices))}
