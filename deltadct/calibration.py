"""Calibration statistics for the methods that need them (``Method.needs_calibration``): the second
moments of the inputs of a model's linear layers, collected with forward hooks, and the Hessians
H = 2·XᵀX/n that GPTQ works with.

>>> from deltadct.calibration import collect_hessians
>>> hessians = collect_hessians(finetuned_model, batches)          # {"encoder.layer.0.q.weight": H, ...}
>>> deltadct.compress(base, finetuned, method="delta_come", calibration=hessians)

Which model: the fine-tuned one. The official GPTQ-for-delta codes quantise the delta inside the
target model: DeltaZip runs the fine-tuned model and compresses W_ft − W_base with the Hessian of
its layer inputs, and Delta-CoMe runs base + Δ (its SVD) the same way. Both go layer by layer,
feeding each layer the outputs of the already compressed layers before it; here every Hessian comes
from one pass through the unmodified fine-tuned model, which needs no model-specific layer loop.

Covered layers: ``nn.Linear`` (H over its input features) and ``nn.Conv2d`` with ``groups=1`` (H over
the unfolded patches, in the (in, kh, kw) order of the kernel viewed as (out, in·kh·kw)). Other
weights (e.g. GPT-2's ``Conv1D``, stored transposed) get no Hessian, and a calibrated method names
them as uncovered. Memory: one in×in float64 matrix per covered layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .gptq import hessian
from .methods.base import matrix_shape


@dataclass
class InputMoments:
    """Σ xxᵀ over every input vector a layer saw, and how many there were."""

    xtx: torch.Tensor
    count: int = 0

    def add(self, inputs: torch.Tensor) -> None:
        inputs = inputs.double()
        self.xtx += inputs.T @ inputs
        self.count += inputs.shape[0]

    def hessian(self) -> torch.Tensor:
        return hessian(self.xtx, self.count)


def layer_input_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A covered layer's input as rows of its weight's columns: (number of input vectors, features)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (batch, in·kh·kw, positions)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return inputs.reshape(-1, inputs.shape[-1])


def covered_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight name: module}`` of the layers whose inputs are collected."""
    return {f"{name}.weight": module for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            or (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")}


def default_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    return model(**batch)


@torch.no_grad()
def collect_input_moments(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                          forward: Callable[[nn.Module, Any], Any] = default_forward) -> dict[str, InputMoments]:
    """Run ``model`` (in eval mode) on every batch and accumulate each covered layer's input moments.

    ``forward(model, batch)`` runs one batch (default ``model(**batch)``). Layers that never ran are
    left out.
    """
    layers = covered_layers(model)
    moments: dict[str, InputMoments] = {}

    def hook(name: str, module: nn.Module):
        def record(_module, args, _output):
            rows = layer_input_rows(module, args[0])
            if name not in moments:
                moments[name] = InputMoments(rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float64))
            moments[name].add(rows)
        return record

    handles = [module.register_forward_hook(hook(name, module)) for name, module in layers.items()]
    training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            forward(model, batch)
            seen += 1
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    if not seen:
        raise ConfigError("calibration needs at least one batch of inputs; none was given")
    return moments


def collect_hessians(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                     forward: Callable[[nn.Module, Any], Any] = default_forward) -> dict[str, torch.Tensor]:
    """``{weight name: H = 2·XᵀX/n}`` (float32) for every covered layer of ``model`` that ran."""
    return {name: m.hessian() for name, m in collect_input_moments(model, batches, forward=forward).items()}


class IdentityHessians(Mapping[str, torch.Tensor]):
    """{tensor name: identity Hessian of its input width} for every tensor of a checkpoint, made on demand.

    For measuring a calibrated method's size without data: its file layout depends on its options
    and the shapes alone, not on the Hessian's values.
    """

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._reader.keys():
            raise KeyError(name)
        return torch.eye(matrix_shape(tuple(self._reader.shape(name)))[1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.keys())

    def __len__(self) -> int:
        return len(self._reader.keys())
