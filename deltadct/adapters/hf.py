"""What the Hugging Face families share: ``from_pretrained`` loading, strict rebuild from a state dict,
``save_pretrained``. Each family module only names its Auto class and its example inputs."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

from ..checkpoints import describe_keys
from ..errors import CheckpointError, KeyMismatchError, ShapeMismatchError
from .base import AdapterError, ModelAdapter, PathLike, checkpoint_path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load reports and progress bars; our own errors say what went wrong."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


#: files of which at least one is present in a dir with a saved tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "merges.txt")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class HuggingFaceAdapter(ModelAdapter):
    """A family loaded by one ``transformers`` Auto class (``auto_class``)."""

    auto_class: ClassVar[str]
    #: the ``transformers.models.auto.modeling_auto`` table of the model classes ``auto_class`` builds
    model_names: ClassVar[str]

    def _auto(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def handles(self, model: nn.Module) -> bool:
        """A model of one of the classes the Auto class builds (by class name: no model code is imported)."""
        from transformers.models.auto import modeling_auto

        names = getattr(modeling_auto, self.model_names).values()
        return type(model).__name__ in {n for entry in names for n in ((entry,) if isinstance(entry, str) else entry)}

    def num_classes(self, model: nn.Module) -> int:
        return model.config.num_labels

    def load(self, path: PathLike, *, device: str = "cpu") -> nn.Module:
        path = checkpoint_path(path)
        try:
            with quiet_transformers():
                model = self._auto().from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path} does not load as {self.auto_class}: {_first_line(err)}") from None
        return model.to(device).eval()

    def load_processor(self, path: PathLike) -> Any:
        """The tokenizer saved with the checkpoint, or None when the dir has no tokenizer files (recent
        transformers would otherwise build an empty tokenizer of special tokens only)."""
        from transformers import AutoTokenizer

        path = checkpoint_path(path)
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            return None
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"the tokenizer in {path} does not load: {_first_line(err)}") from None

    def load_with_state_dict(self, path: PathLike, state_dict: Mapping[str, torch.Tensor], *,
                             device: str = "cpu") -> nn.Module:
        from transformers import AutoConfig

        path = checkpoint_path(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path} has no usable config.json: {_first_line(err)}") from None
        with quiet_transformers():
            # The Auto class only picks the concrete class; building it on the meta device costs nothing.
            with torch.device("meta"):
                model_class = type(self._auto().from_config(config))
            # from_pretrained (not load_state_dict) so legacy names, tied weights and dtype follow the
            # family's normal loading rules; sizes are checked below with a clearer message than its own.
            model, info = model_class.from_pretrained(None, config=config, state_dict=dict(state_dict),
                                                      output_loading_info=True, ignore_mismatched_sizes=True)
        where = f"{model_class.__name__} from {path}"
        if info["mismatched_keys"]:
            key, got, expected = min(info["mismatched_keys"], key=lambda item: item[0])
            more = len(info["mismatched_keys"]) - 1
            raise ShapeMismatchError(f"tensor {key!r} has shape {list(got)} in the state dict but {list(expected)} "
                                     f"in {where}" + (f" (and {more} more)" if more else ""))
        if info["unexpected_keys"]:
            raise KeyMismatchError(f"{len(info['unexpected_keys'])} tensor(s) do not belong to {where}: "
                                   f"{describe_keys(sorted(info['unexpected_keys']))}")
        if info["missing_keys"]:
            raise KeyMismatchError(f"{len(info['missing_keys'])} tensor(s) of {where} are missing from the "
                                   f"state dict: {describe_keys(sorted(info['missing_keys']))}")
        return model.to(device).eval()

    def save(self, model: nn.Module, out_dir: PathLike) -> Path:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        return out_dir


def random_token_ids(processor: Any, model: nn.Module, *, num: int, length: int, seed: int) -> torch.Tensor:
    """``num`` x ``length`` token ids drawn uniformly from the vocabulary with a fixed seed."""
    vocab = len(processor) if processor is not None else model.config.vocab_size
    vocab = min(vocab, model.get_input_embeddings().num_embeddings)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=generator)


def tokenized(processor: Any, model: nn.Module, samples: list, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Each text sample (a string, or a tuple of strings for sentence pairs) tokenised on its own, so no
    padding enters the calibration statistics."""
    if processor is None:
        raise AdapterError("calibration needs the tokenizer saved with the checkpoint; none was found")
    device = model_device(model)
    return [dict(processor(*(s if isinstance(s, tuple) else (s,)), truncation=True, max_length=seq_len,
                           return_tensors="pt").to(device)) for s in samples]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
