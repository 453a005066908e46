"""Calibration data for deltadct-run (``calibration=`` config group, conf/calibration/).

``calibration=task`` draws ``num_samples`` examples, fixed by ``seed``, from the task's own
``split`` (default ``train``) and turns them into model inputs with the pair's adapter:

- GLUE tasks (data kinds ``glue`` and ``glue_text2text``): ``<DATA>/glue/<task>/<split>.tsv`` (the
  zoo's data dir, ``$DELTADCT_DATA_DIR`` or ``../shared/data``); for a zoo task without such a file
  (QNLI and MNLI have no training file offline) its ``train`` split is what the zoo fine-tuned on
  (:func:`experiments.zoo.glue.finetune_splits`); else ``datasets``' hub ``glue``; text-to-text
  tasks through the data spec's ``input_template``;
- image folders: the ``<split>`` folder next to the evaluation folder, or, for the ViT zoo, the
  images each task was fine-tuned on;
- ``datasets`` image data: the same dataset at ``split``.

The samples feed the methods that need calibration data: the layer-input Hessians of the
fine-tuned model (:func:`deltadct.calibration.collect_hessians`) and BitDelta's scale distillation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltadct.errors import ConfigError, DeltaDCTError

#: data-spec kinds → the modality of their samples
KIND_MODALITY = {"glue": "text", "glue_text2text": "text", "imagefolder": "image", "datasets": "image"}


def uses_calibration(method_class: type) -> bool:
    """Whether a run of this method needs calibration data: Hessians, or a distillation step."""
    return bool(method_class.needs_calibration or hasattr(method_class, "distill"))


def sample_modality(data: dict, task: str) -> str:
    kind = data.get("kind")
    if kind not in KIND_MODALITY:
        raise ConfigError(f"calibration: task {task!r} has data of kind {kind!r}, which has no training split "
                          f"calibration=task can read (kinds: {sorted(KIND_MODALITY)}); use calibration=none "
                          "and a method that needs no calibration data")
    return KIND_MODALITY[kind]


def check_modality(data: dict, task: str, adapter) -> None:
    """A ConfigError when the task's samples are not what the adapter's models take (e.g. images for text)."""
    modality = sample_modality(data, task)
    if adapter.modality != modality:
        raise ConfigError(f"calibration data of task {task!r} are {modality} samples but adapter {adapter.name!r} "
                          f"takes {adapter.modality or 'no calibration data'}: point the task's data at "
                          f"{adapter.modality or 'a supported model family'} data or use calibration=none")


def _subset(count: int, conf: Any) -> list[int]:
    if count == 0:
        raise ConfigError(f"calibration.split {conf.split!r} has no examples")
    rng = np.random.default_rng(conf.seed)
    return sorted(rng.choice(count, size=min(conf.num_samples, count), replace=False).tolist())


def _glue_samples(data: dict, task: str, zoo: str | None, conf: Any) -> list:
    from eval.errors import EvalError
    from eval.glue import default_template, glue_task, load_glue_split
    from experiments.zoo.glue import GLUE_TASKS, data_root, finetune_splits

    spec = glue_task(data.get("task", task))
    # the zoo's own data dir holds only its evaluation split; the shared GLUE dir has the training split
    candidates = [Path(d) for d in (data.get("data_dir"), data_root() / "glue") if d is not None]
    data_dir = next((d for d in candidates if (d / spec.name / f"{conf.split}.tsv").is_file()), None)
    try:
        if data_dir is None and zoo is not None and conf.split == "train" and spec.name in GLUE_TASKS:
            texts = [ex["texts"] for ex in finetune_splits(spec.name)[0]]  # a re-split task's training part
        else:
            texts, _ = load_glue_split(spec, conf.split, data_dir)
    except EvalError as err:
        raise ConfigError(f"calibration.split {conf.split!r} of GLUE {spec.name} is missing ({err}); set "
                          "calibration.split to a split that exists") from None
    chosen = [texts[i] for i in _subset(len(texts), conf)]
    if data.get("kind") == "glue_text2text":
        template = data.get("input_template") or default_template(spec)
        return [template.format(**dict(zip(spec.text_columns, t, strict=True))) for t in chosen]
    return [t if len(t) > 1 else t[0] for t in chosen]


def _image_samples(data: dict, task: str, zoo: str | None, conf: Any) -> list:
    from PIL import Image

    from eval.errors import EvalError
    from eval.vision import ImageSource

    mode = data.get("image_mode") or "RGB"
    if data.get("kind") == "datasets":
        spec = {**data, "split": conf.split}
    else:
        folder = Path(data["root"]).parent / conf.split
        if not folder.is_dir() and zoo == "vit" and conf.split == "train":
            from experiments.zoo.vit import training_images

            images = training_images(task)
            return [Image.fromarray(images[i], mode="L").convert(mode) for i in _subset(len(images), conf)]
        if not folder.is_dir():
            raise ConfigError(f"calibration.split {conf.split!r} of task {task!r} is missing: no image folder "
                              f"{folder}; set calibration.split to a split that exists")
        spec = {"kind": "imagefolder", "root": str(folder)}
    try:
        source = ImageSource(spec, mode)
    except EvalError as err:
        raise ConfigError(f"calibration.split {conf.split!r} of task {task!r} is missing ({err})") from None
    return [source.image(i) for i in _subset(len(source), conf)]


def task_samples(data: dict, task: str, zoo: str | None, conf: Any) -> list:
    """``conf.num_samples`` raw samples (texts or PIL images) of the task's ``conf.split``, fixed by ``conf.seed``."""
    if sample_modality(data, task) == "text":
        return _glue_samples(data, task, zoo, conf)
    return _image_samples(data, task, zoo, conf)


def calibration_batches(conf: Any, adapter, model: torch.nn.Module, processor: Any, task: str, data: dict,
                        zoo: str | None) -> list[dict[str, torch.Tensor]]:
    """The model inputs (one sample each) of ``calibration=task`` for one task."""
    check_modality(data, task, adapter)
    try:
        return adapter.calibration_inputs(model, processor, task_samples(data, task, zoo, conf), seq_len=conf.seq_len)
    except DeltaDCTError:
        raise
    except (OSError, ValueError, KeyError) as err:  # unreadable sample files
        raise ConfigError(f"calibration samples of task {task!r} cannot be read: {str(err).splitlines()[0]}") from None


def distillation_student(adapter, finetuned_path: Path, base: Path, delta_path: Path, device: str) -> torch.nn.Module:
    """The fine-tuned architecture holding the base weights where the delta file compresses a tensor and
    the file's values elsewhere (new heads, kept tensors): what scale distillation adds Δ̂ to."""
    import deltadct

    dfile = deltadct.load(delta_path)
    state = deltadct.apply(base, dfile, device=device, progress=False)
    for name in dfile.names("compressed"):  # base + Δ̂ − Δ̂: the base tensor, to float32 rounding
        state[name] = (state[name].float() - dfile.reconstruct(name).cpu()).to(state[name].dtype)
    return adapter.load_with_state_dict(finetuned_path, state, device=device)
