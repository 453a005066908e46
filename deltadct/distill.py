"""BitDelta scale distillation: fit each matrix's scale to the fine-tuned model's outputs.

BitDelta stores Δ ≈ α·sign(Δ) with α = mean |Δ| per matrix. That α minimises each matrix's own
error; the paper then tunes the α's jointly so the *model* matches the fine-tuned one on a few
calibration batches. Only the scales move (one number per matrix); the sign bits stay as stored,
so the file keeps its size and layout and any deltadct reader applies the result.

>>> from deltadct.distill import distill_bitdelta_scales
>>> tuned, report = distill_bitdelta_scales("ft.bitdelta.safetensors", base_model, finetuned_model,
...                                         batches, steps=100)
>>> tuned.save("ft.bitdelta-distilled.safetensors")

By default each scale is trained as α = α₀·g with a gain g starting at 1, so the learning rate is
relative (``lr=1e-2`` moves a scale by about 1 % per Adam step) whatever the magnitude of the weights.
``absolute=True`` trains the scales themselves, as the official code (FasterDecoding/BitDelta) does
with AdamW (lr 1e-4, weight decay 0.01) and a cosine schedule over the steps (``schedule="cosine"``).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.func import functional_call

from .errors import ConfigError
from .format import DeltaFile, finalize_header, in_memory, load, tensor_name
from .io import SafetensorsWriter
from .methods import get_method_class
from .methods.bitdelta import SCALE_FIELD, BitDelta, sign_times_scale

LOSSES = ("mse", "kl")
SCHEDULES = ("constant", "cosine")


@dataclass
class DistillReport:
    """Calibration loss (mean over the batches) with the stored scales and with the distilled ones."""

    loss_before: float
    loss_after: float
    steps: int
    matrices: int


def _logits(output: Any) -> torch.Tensor:
    """The logits of a forward pass: a tensor, an HF ``ModelOutput`` (``.logits``) or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"cannot find logits in a model output of type {type(output).__name__}")


def _forward(model: torch.nn.Module, batch: Any, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``model`` on a batch (a tensor, a tuple of positional inputs, or a dict of keyword inputs)."""
    args, kwargs = ((), batch) if isinstance(batch, dict) else (
        (tuple(batch), {}) if isinstance(batch, (tuple, list)) else ((batch,), {}))
    if state is None:
        return _logits(model(*args, **kwargs))
    return _logits(functional_call(model, state, args, kwargs, strict=False))


def _loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return torch.nn.functional.mse_loss(student, teacher)
    # KL(teacher ‖ student) over the last (class / vocabulary) dimension
    return torch.nn.functional.kl_div(student.log_softmax(-1).reshape(-1, student.shape[-1]),
                                      teacher.log_softmax(-1).reshape(-1, teacher.shape[-1]),
                                      log_target=True, reduction="batchmean")


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module):
    """Put models in eval mode (no dropout) for the duration, then restore their modes."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def distill_bitdelta_scales(delta: DeltaFile | str | os.PathLike, base_model: torch.nn.Module,
                            teacher: torch.nn.Module, batches: Sequence[Any], *, steps: int = 100,
                            lr: float = 1e-2, loss: str = "mse", absolute: bool = False,
                            schedule: str = "constant", weight_decay: float = 0.0) -> tuple[DeltaFile, DistillReport]:
    """Tune the per-matrix scales of a BitDelta file so base + Δ̂ matches ``teacher``'s logits.

    ``base_model`` and ``teacher`` are the base and fine-tuned models (same architecture; their
    ``state_dict`` names are the tensor names of the delta file). ``batches`` are calibration inputs,
    each a tensor, a tuple of positional inputs or a dict of keyword inputs; ``steps`` Adam steps
    cycle through them with AdamW (``weight_decay``; 0 is Adam) and a ``schedule`` of the learning
    rate. Returns a new in-memory :class:`DeltaFile` (``.save(path)`` writes it) and a
    :class:`DistillReport`. Neither model is modified.
    """
    dfile = delta if isinstance(delta, DeltaFile) else load(delta)
    if not issubclass(get_method_class(dfile.method_name), BitDelta):
        raise ConfigError(f"scale distillation needs a bitdelta file; {dfile.path or 'this delta'} "
                          f"was made with {dfile.method_name!r}")
    if loss not in LOSSES:
        raise ConfigError(f"option 'loss': {loss!r} is not one of {list(LOSSES)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"option 'schedule': {schedule!r} is not one of {list(SCHEDULES)}")
    if steps < 0 or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"steps must be >= 0 and lr > 0 (got steps={steps}, lr={lr})")
    batches = list(batches)
    if not batches:
        raise ConfigError("scale distillation needs at least one calibration batch")

    base_state = dict(base_model.state_dict())
    names = [n for n in dfile.names("compressed") if n in base_state]
    if not names:
        raise ConfigError("no compressed tensor of the delta is a parameter of base_model: the state_dict "
                          f"names must match the delta's (e.g. {dfile.names('compressed')[:3]})")
    device = next(iter(base_state.values())).device
    fixed = {n: dfile.value(n).to(device) for n in dfile.names() if n in base_state and n not in names}
    signs, scales0 = {}, {}
    for n in names:
        compressed = dfile.compressed(n, device)
        signs[n] = BitDelta.signs(compressed, tuple(dfile.entries[n]["shape"]))
        scales0[n] = compressed.tensors[SCALE_FIELD].float()
    # the trained parameter per matrix: a gain on its stored scale, or (absolute) the scale itself
    trained = (torch.cat([scales0[n].reshape(1) for n in names]) if absolute
               else torch.ones(len(names), device=device)).requires_grad_(True)

    def scale(i: int, n: str) -> torch.Tensor:
        return trained[i] if absolute else scales0[n] * trained[i]

    def student_state() -> dict[str, torch.Tensor]:
        state = {**base_state, **fixed}
        for i, n in enumerate(names):
            w = base_state[n]
            state[n] = (w.float() + sign_times_scale(signs[n], scale(i, n))).to(w.dtype)
        return state

    def calibration_loss() -> float:
        with torch.no_grad():
            state = student_state()
            return sum(float(_loss(_forward(base_model, b, state), _forward(teacher, b), loss))
                       for b in batches) / len(batches)

    with _eval_mode(base_model, teacher):
        before = calibration_loss()
        opt = torch.optim.AdamW([trained], lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if schedule == "cosine" else None
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = _forward(teacher, batch)
            opt.zero_grad()
            _loss(_forward(base_model, batch, student_state()), target, loss).backward()
            opt.step()
            if sched is not None:
                sched.step()
        after = calibration_loss()

    new_scales = {n: scale(i, n).detach().reshape(1).cpu() for i, n in enumerate(names)}
    header = dict(dfile.header)
    header["entries"] = {n: dict(e) for n, e in dfile.entries.items()}
    teacher_state = teacher.state_dict()
    for n in names:  # the recorded per-layer error changes with the scale
        if "rel_error" in header["entries"][n] and n in teacher_state:
            true = (teacher_state[n].float() - base_state[n].float()).cpu()
            approx = sign_times_scale(signs[n].cpu(), new_scales[n])
            norm = float(torch.linalg.vector_norm(true))
            if norm > 0:
                header["entries"][n]["rel_error"] = round(float(torch.linalg.vector_norm(approx - true)) / norm, 6)
    header["distillation"] = {"steps": steps, "lr": lr, "loss": loss, "absolute": absolute, "schedule": schedule,
                              "weight_decay": weight_decay, "batches": len(batches),
                              "loss_before": before, "loss_after": after}
    writer = SafetensorsWriter(None)
    for name in dfile.entries:
        for field, value in dfile.fields(name).items():
            if field == SCALE_FIELD and name in new_scales:
                value = new_scales[name]
            writer.add(tensor_name(name, field), value)
    header = finalize_header(header, writer)
    return in_memory(header, writer), DistillReport(before, after, steps, len(names))
