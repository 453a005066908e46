"""BitDelta with scale distillation, as the BitDelta paper reports it (Liu et al., 2024; official code
FasterDecoding/BitDelta ``train.py``).

The file layout and :meth:`compress` are BitDelta's (``sign(Δ)`` bits + one scale per matrix, the
initial scale mean |Δ|); :meth:`distill` then fits the scales so that base + Δ̂ matches the
fine-tuned model's logits on calibration batches: logit MSE, AdamW on the scales themselves (lr
1e-4, weight decay 0.01, the optimiser's defaults in the official code), a cosine schedule over
``steps`` steps. ``deltadct-run method=bitdelta_distilled`` compresses, distils on
``calibration=task`` samples and evaluates the distilled file; ``deltadct.compress`` alone (no
models at hand) writes the initial scales, and its header has no ``distillation`` entry.

Departures: the official code draws a fresh batch of 4 sequences (C4 or the fine-tuning data, 128
tokens) per step; here the ``steps`` cycle over the calibration samples, one sample per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import register_method
from .base import check_choice, check_range
from .bitdelta import BitDelta, BitDeltaConfig


@dataclass
class BitDeltaDistilledConfig(BitDeltaConfig):
    #: optimiser steps (one calibration sample each, cycling)
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.01
    #: learning-rate schedule over the steps: cosine | constant
    schedule: str = "cosine"

    def validate(self) -> None:
        check_range("steps", self.steps, 1)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_choice("schedule", self.schedule, ("cosine", "constant"))


@register_method
class BitDeltaDistilled(BitDelta):
    name = "bitdelta_distilled"
    Config = BitDeltaDistilledConfig

    def distill(self, delta, base_model: torch.nn.Module, teacher: torch.nn.Module, batches: Sequence[Any]):
        """Distil the scales of ``delta`` (a file of this method) on ``batches``; returns
        (distilled in-memory DeltaFile, DistillReport). See :func:`deltadct.distill.distill_bitdelta_scales`."""
        from ..distill import distill_bitdelta_scales

        c = self.config
        return distill_bitdelta_scales(delta, base_model, teacher, batches, steps=c.steps, lr=c.lr, loss="mse",
                                       absolute=True, schedule=c.schedule, weight_decay=c.weight_decay)
