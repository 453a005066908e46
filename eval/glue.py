"""GLUE evaluator: the eight tasks the paper reports and WNLI, for encoder classifiers and text-to-text models.

Data come from a local folder ``<data_dir>/<task>/<split>.tsv`` (tab-separated, header row, the
column names of the hub's ``glue`` dataset, labels as ids or label names) when the data spec or the
options name a ``data_dir``, else from ``datasets.load_dataset("glue", task)``.
Encoder classifiers predict by argmax (STS-B: the single regression output); encoder-decoders
(T5) generate greedily from ``input_template`` and the answer, stripped, must equal one of
``label_words`` exactly (anything else counts as wrong).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import (
    EvalContext, EvalOptions, Evaluator, batches, register_evaluator, require_processor, sample_indices,
    shared_outputs,
)
from .errors import EvalError
from .examples import encode_examples
from .metrics import glue_metrics


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None  # index = label id; None for the STS-B regression
    split: str = "validation"  # default evaluation split

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1


GLUE_TASKS = {t.name: t for t in (
    GlueTask("cola", ("sentence",), ("unacceptable", "acceptable")),
    GlueTask("sst2", ("sentence",), ("negative", "positive")),
    GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    GlueTask("stsb", ("sentence1", "sentence2"), None),
    GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
    GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "validation_matched"),
    GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
)}


def glue_task(name: str) -> GlueTask:
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise EvalError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}") from None


def _parse_label(task: GlueTask, raw: Any, where: str) -> float:
    text = str(raw).strip()
    if task.label_names is None:
        return float(text)
    if text in task.label_names:
        return task.label_names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < task.num_labels:
        return int(text)
    raise EvalError(f"{where}: label {text!r} is not one of {list(task.label_names)} or their ids "
                    f"0..{task.num_labels - 1}")


def read_glue_tsv(path: Path, task: GlueTask) -> tuple[list[tuple[str, ...]], list[float]]:
    """Texts (one tuple per example) and labels of one local GLUE split."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in (*task.text_columns, "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalError(f"{path} lacks column(s) {missing} that GLUE {task.name} needs "
                            f"(has {reader.fieldnames})")
        rows = list(reader)
    texts = [tuple(r[c].strip() for c in task.text_columns) for r in rows]
    labels = [_parse_label(task, r["label"], f"{path} row {i + 2}") for i, r in enumerate(rows)]
    return texts, labels


def load_glue_split(task: GlueTask, split: str, data_dir: str | Path | None):
    """Texts and labels of ``split``: from ``data_dir`` if given, else from the hub's ``glue`` dataset."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        path = data_dir / task.name / f"{split}.tsv"
        if not path.is_file():
            present = sorted(p.stem for p in (data_dir / task.name).glob("*.tsv"))
            raise EvalError(f"GLUE {task.name}: no split {split!r} in {data_dir / task.name} "
                            f"(expected {path.name}; found {present or 'no .tsv files'})")
        return read_glue_tsv(path, task)
    try:
        import datasets

        ds = datasets.load_dataset("glue", task.name, split=split)
    except Exception as err:  # noqa: BLE001 - no datasets package, hub or cache failure: the data is just not there
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"GLUE {task.name} {split}: datasets.load_dataset('glue', {task.name!r}) failed "
                        f"({reason}); pass data_dir=<folder with {task.name}/{split}.tsv> to use local files")
    labels = [float(r["label"]) if task.label_names is None else int(r["label"]) for r in ds]
    if task.label_names is not None and any(label < 0 for label in labels):
        raise EvalError(f"GLUE {task.name} {split} has no labels (GLUE test sets are hidden); use a validation split")
    return [tuple(r[c] for c in task.text_columns) for r in ds], labels


def encode_text_pairs(tokenizer, rows, max_length: int, device) -> dict[str, torch.Tensor]:
    """One batch of GLUE rows (tuples of the task's text columns) as padded encoder inputs on ``device``."""
    return tokenizer(*zip(*rows, strict=True), truncation=True, max_length=max_length, padding="longest",
                     return_tensors="pt").to(device)


def text_batch_key(task: str, split: str, data_dir: str | Path | None, max_length: int, indices) -> tuple:
    """What names one encoded batch of a GLUE split for :func:`~eval.base.shared_outputs`."""
    return ("glue-text", task, split, str(data_dir), max_length, tuple(int(i) for i in indices))


def default_template(task: GlueTask) -> str:
    """T5's GLUE input format, e.g. ``"rte sentence1: {sentence1} sentence2: {sentence2}"`` (MNLI puts the
    hypothesis first)."""
    columns = list(task.text_columns)
    if task.name == "mnli":
        columns.reverse()
    return " ".join([task.name] + [f"{column}: {{{column}}}" for column in columns])


@dataclass
class GlueOptions(EvalOptions):
    #: evaluation split; None = the data spec's ``split``, else the task's validation split
    split: str | None = None
    #: evaluate a seeded random subset of this many examples (None = all)
    max_samples: int | None = None
    batch_size: int = 64
    #: token limit of encoder inputs; None = the data spec's ``max_length``, else 128
    max_length: int | None = None
    #: local GLUE folder; None = the data spec's ``data_dir``, else the hub
    data_dir: str | None = None
    #: text-to-text models: words generated for each label id (empty = the data spec's, else GLUE's names)
    label_words: tuple[str, ...] = ()
    #: text-to-text models: input text, ``str.format`` fields = the task's columns (None = the data spec's
    #: ``input_template``, else T5's GLUE format)
    input_template: str | None = None
    #: text-to-text models: generation length (None = the data spec's ``max_new_tokens``, else 8)
    max_new_tokens: int | None = None
    progress: bool = True


@register_evaluator
class GlueEvaluator(Evaluator):
    name = "glue"
    Options = GlueOptions

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        opts = self.options
        task = glue_task(ctx.data.get("task", ctx.task))
        tokenizer = require_processor(ctx)
        split = opts.split or ctx.data.get("split") or task.split
        data_dir = opts.data_dir or ctx.data.get("data_dir")
        texts_all, labels = load_glue_split(task, split, data_dir)
        keep = sample_indices(len(texts_all), opts.max_samples, opts.seed)
        texts, labels = [texts_all[i] for i in keep], [labels[i] for i in keep]
        adapter = ctx.adapter_for(model)
        if adapter.answers_by == "generate":
            predictions = self._generate(model, adapter, tokenizer, task, texts, ctx)
        elif adapter.answers_by == "classify":
            predictions = self._classify(model, adapter, tokenizer, task, texts, ctx,
                                         split=split, data_dir=data_dir, keep=keep.tolist())
        else:
            raise EvalError(f"GLUE {task.name}: {adapter.name} models neither classify nor generate answers "
                            "(score language models with the lm_eval evaluator)")
        self.last_examples = encode_examples(f"glue:{task.name}", labels=labels, predictions=predictions,
                                             index=keep if len(keep) < len(texts_all) else None)
        return {**glue_metrics(task.name, labels, predictions), "num_examples": float(len(labels))}

    def _batches(self, items: list, desc: str):
        return batches(items, self.options.batch_size, desc=desc, progress=self.options.progress)

    @torch.no_grad()
    def _classify(self, model, adapter, tokenizer, task: GlueTask, texts, ctx: EvalContext, *,
                  split: str, data_dir: str | Path | None, keep: list[int]) -> list[float]:
        """Predictions for ``texts``, rows ``keep`` of the task's ``split`` read from ``data_dir``."""
        num_labels = adapter.num_classes(model)
        if num_labels != task.num_labels:
            raise EvalError(f"the model has {num_labels} output label(s) but GLUE {task.name} has "
                            f"{task.num_labels}; wrong checkpoint for this task?")
        max_length = self.options.max_length or ctx.data.get("max_length") or 128
        device = next(model.parameters()).device
        predictions: list[float] = []
        for batch in self._batches(list(zip(keep, texts, strict=True)), f"glue {task.name}"):
            indices, rows = zip(*batch, strict=True)
            key = text_batch_key(task.name, split, data_dir, max_length, indices)
            logits = shared_outputs(model, key, lambda rows=rows: (
                adapter.logits(model, encode_text_pairs(tokenizer, rows, max_length, device))))
            predictions.extend(logits[:, 0].tolist() if task.label_names is None else logits.argmax(-1).tolist())
        return predictions

    @torch.no_grad()
    def _generate(self, model, adapter, tokenizer, task: GlueTask, texts, ctx: EvalContext) -> list[float]:
        words = tuple(self.options.label_words or ctx.data.get("label_words") or task.label_names or ())
        if task.label_names is not None and len(words) != task.num_labels:
            raise EvalError(f"label_words {list(words)} do not fit GLUE {task.name}'s "
                            f"{task.num_labels} labels {list(task.label_names)}")
        lookup = {w.strip(): i for i, w in enumerate(words)}
        template = self.options.input_template or ctx.data.get("input_template") or default_template(task)
        max_length = self.options.max_length or ctx.data.get("max_input_length") or ctx.data.get("max_length") or 512
        max_new_tokens = self.options.max_new_tokens or ctx.data.get("max_new_tokens") or 8
        device = next(model.parameters()).device
        predictions: list[float] = []
        for batch in self._batches(texts, f"glue {task.name}"):
            try:
                prompts = [template.format(**dict(zip(task.text_columns, t, strict=True))) for t in batch]
            except (KeyError, IndexError) as err:
                raise EvalError(f"input_template {template!r} uses a field GLUE {task.name} does not have "
                                f"({err}); fields: {list(task.text_columns)}") from None
            enc = tokenizer(prompts, truncation=True, max_length=max_length, padding="longest",
                            return_tensors="pt").to(device)
            out = adapter.generate(model, enc, max_new_tokens=max_new_tokens)
            for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                predictions.append(_decode_prediction(text, task, lookup))
        return predictions


def _decode_prediction(text: str, task: GlueTask, lookup: dict[str, int]) -> float:
    """A generated answer as a label id (-1, always wrong, when it is no label word) or, for STS-B, the
    similarity it states (0.0, the lowest, when it states none)."""
    text = text.strip()
    if task.label_names is None:
        try:
            value = float(text)
        except ValueError:
            return 0.0
        return value if math.isfinite(value) else 0.0
    return lookup.get(text, -1)
