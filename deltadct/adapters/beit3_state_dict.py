"""BEiT-3 checkpoints as the public BEiT-3 code ships them: a state dict (``.pth`` nested under
``"model"``, or ``.safetensors``) with multiway experts (``ffn.A``/``ffn.B``) per layer.

deltadct compresses and applies these pairs like any other checkpoint, but does not ship BEiT-3's model
code (torchscale plus the task heads of the ``unilm/beit3`` repository). So here a "model" is the state
dict itself, held in a :class:`StateDictModel`: parameter-level checks (the reconstruction evaluator's
per-layer errors) work, running it raises :class:`AdapterError`. To evaluate BEiT-3 on its tasks,
write the reconstructed weights with ``deltadct.apply(base, delta, out=...)`` or ``save`` and load them
with the BEiT-3 repository's own scripts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoints import open_checkpoint
from .base import AdapterError, ModelAdapter, PathLike, check_state_dict_fits, checkpoint_path, register_adapter

NO_MODEL_CODE = ("BEiT-3 task evaluation needs the model code of the BEiT-3 repository (unilm/beit3), which "
                 "deltadct does not ship; save the reconstructed state dict and evaluate it there")


class StateDictModel(nn.Module):
    """A state dict as a module tree: ``state_dict()`` and ``named_parameters()`` give back exactly its
    names and tensors (frozen); calling it raises :class:`AdapterError`."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        super().__init__()
        for name, tensor in state_dict.items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise AdapterError(NO_MODEL_CODE)


@register_adapter
class BEiT3StateDictAdapter(ModelAdapter):
    name = "beit3_state_dict"
    # Fine-tuned BEiT-3 checkpoints add task heads (and may drop pre-training-only heads).
    policy_defaults = {"extra_keys": "keep", "missing_keys": "ignore"}

    def load(self, path: PathLike, *, device: str = "cpu") -> nn.Module:
        ckpt = open_checkpoint(checkpoint_path(path))
        return StateDictModel({k: v.to(device) for k, v in ckpt.items()})

    def load_with_state_dict(self, path: PathLike, state_dict: Mapping[str, torch.Tensor], *,
                             device: str = "cpu") -> nn.Module:
        ckpt = open_checkpoint(checkpoint_path(path))
        check_state_dict_fits({k: ckpt.shape(k) for k in ckpt.keys()}, state_dict, where=path)
        return StateDictModel({k: v.to(device) for k, v in state_dict.items()})

    def save(self, model: nn.Module, out_dir: PathLike) -> Path:
        """``out_dir`` ending in ``.safetensors`` gets a flat safetensors file, ending in ``.pth``/``.pt`` a
        torch file nested under ``"model"`` like the public checkpoints; any other path is a directory
        that receives ``model.pth``."""
        out = Path(out_dir)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if out.suffix == ".safetensors":
            out.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out))
            return out
        if out.suffix not in (".pth", ".pt"):
            out = out / "model.pth"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state}, out)
        return out

    def example_inputs(self, model: nn.Module, processor: Any, *, num: int, seed: int) -> dict[str, torch.Tensor]:
        raise AdapterError(NO_MODEL_CODE)

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, StateDictModel)
