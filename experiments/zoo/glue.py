"""The real GLUE data the text families train and evaluate on, read offline.

Looked up as ``$DELTADCT_DATA_DIR/glue/<task>/<split>.tsv``, else ``<repo>/../shared/data/glue/...``,
else through ``datasets.load_dataset("glue", task)`` (which works offline only from its own cache).
Labels are ints as in the hub's GLUE (RTE 0 = entailment, 1 = not_entailment), STS-B's a float 0–5.

:func:`finetune_splits` gives the (train, evaluation) examples of a task. QNLI and MNLI have no
training file offline, so their labelled validation files are re-split: MNLI trains on
``validation_matched`` and is evaluated on ``validation_mismatched`` (other genres, as GLUE's
mismatched set intends); QNLI's ``validation`` is split by a fixed seed (:data:`QNLI_EVAL_SIZE`
examples for evaluation, the rest for training), the same split for every zoo seed and mode.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from eval import metrics as glue_metrics
from experiments.zoo.common import ZooDataError


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]
    metric: str
    label_words: tuple[str, ...]  # index = label id; used by the text-to-text and causal-LM families; () = regression

    @property
    def is_regression(self) -> bool:
        return not self.label_words


GLUE_TASKS = {
    "sst2": GlueTask("sst2", ("sentence",), "accuracy", ("negative", "positive")),
    "cola": GlueTask("cola", ("sentence",), "matthews_correlation", ("unacceptable", "acceptable")),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), "accuracy_f1", ("not_equivalent", "equivalent")),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), "pearson_spearman", ()),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), "accuracy", ("entailment", "not_entailment")),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), "accuracy", ("not_entailment", "entailment")),
    "qnli": GlueTask("qnli", ("question", "sentence"), "accuracy", ("entailment", "not_entailment")),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), "accuracy", ("entailment", "neutral", "contradiction")),
}
#: QNLI validation examples held out for evaluation (of 5463); the other 3463 train
QNLI_EVAL_SIZE = 2000
#: seed of the QNLI re-split and of evaluation subsets: fixed, so every zoo seed is scored on the same examples
SPLIT_SEED = 0

Example = dict  # {"texts": tuple[str, ...], "label": int}


def data_root() -> Path:
    """The data dir: ``$DELTADCT_DATA_DIR``, else ``../shared/data`` relative to the repo root."""
    env = os.environ.get("DELTADCT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _parse_label(task: GlueTask, raw: str) -> int | float:
    raw = raw.strip()
    if task.is_regression:
        return float(raw)
    return task.label_words.index(raw) if raw in task.label_words else int(raw)


def read_tsv(path: Path, task: GlueTask) -> list[Example]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"texts": tuple(r[c].strip() for c in task.text_columns),
             "label": _parse_label(task, r["label"])} for r in rows]


def write_tsv(path: Path, task: GlueTask, examples: list[Example]) -> None:
    """Write examples in the GLUE TSV layout ``read_tsv`` (and the GLUE evaluator) reads."""
    # GLUE fields never hold tabs or newlines, so plain joins round-trip exactly (no quoting).
    lines = ["\t".join([*task.text_columns, "label"])]
    for ex in examples:
        label = task.label_words[ex["label"]] if task.name == "rte" else str(ex["label"])
        lines.append("\t".join([*ex["texts"], label]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _load_from_datasets(task: GlueTask, split: str) -> list[Example]:
    import datasets

    ds = datasets.load_dataset("glue", task.name, split=split)
    cast = float if task.is_regression else int
    return [{"texts": tuple(r[c] for c in task.text_columns), "label": cast(r["label"])} for r in ds]


def load_glue(name: str, split: str) -> list[Example]:
    """All examples of one GLUE split; a clear ZooDataError when neither source has it."""
    task = GLUE_TASKS[name]
    path = data_root() / "glue" / name / f"{split}.tsv"
    if path.is_file():
        return read_tsv(path, task)
    try:
        return _load_from_datasets(task, split)
    except Exception as err:  # noqa: BLE001 - any hub/cache failure means the data is simply not available offline
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ZooDataError(
            f"GLUE {name} {split} data not found: no file {path} and datasets.load_dataset('glue', "
            f"'{name}') failed ({reason}); put the GLUE TSVs at <DATA>/glue/{name}/{split}.tsv and set "
            f"DELTADCT_DATA_DIR=<DATA> (default: ../shared/data next to the repo)") from None


def subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A deterministic random subset of ``n`` examples in their original order (all when n is None)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in keep]


def finetune_splits(name: str) -> tuple[list[Example], list[Example]]:
    """(training, evaluation) examples of a task; QNLI and MNLI re-split offline (module docstring)."""
    if name == "mnli":
        return load_glue(name, "validation_matched"), load_glue(name, "validation_mismatched")
    if name == "qnli":
        examples = load_glue(name, "validation")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
        held_out = set(order[:QNLI_EVAL_SIZE].tolist())
        return ([ex for i, ex in enumerate(examples) if i not in held_out],
                [ex for i, ex in enumerate(examples) if i in held_out])
    return load_glue(name, "train"), load_glue(name, "validation")


def score(metric: str, labels: list, predictions: list) -> float:
    """GLUE's per-task number (``eval.metrics``): accuracy, Matthews correlation, the mean of accuracy
    and F1 (``accuracy_f1``, MRPC) or of Pearson and Spearman (``pearson_spearman``, STS-B; 0 when the
    predictions are constant, where the correlation is undefined). Predictions outside the label set
    (e.g. unmapped generations) count as wrong."""
    if metric == "accuracy":
        return glue_metrics.accuracy(labels, predictions)
    if metric == "matthews_correlation":
        return glue_metrics.matthews_correlation(labels, predictions)
    if metric == "accuracy_f1":
        return (glue_metrics.accuracy(labels, predictions) + glue_metrics.f1_binary(labels, predictions)) / 2
    if metric == "pearson_spearman":
        value = (glue_metrics.pearson(predictions, labels) + glue_metrics.spearman(predictions, labels)) / 2
        return 0.0 if np.isnan(value) else float(value)
    raise ValueError(f"unknown metric {metric!r}")


def majority_score(metric: str, labels: list) -> float:
    """The metric of predicting the most frequent label for every example (STS-B: its mean score)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    constant = float(np.mean(labels)) if metric == "pearson_spearman" else values[np.argmax(counts)]
    return score(metric, labels, [constant] * len(labels))


def write_eval_data(out: Path, name: str, examples: list[Example]) -> Path:
    """Write the exact evaluation examples as ``<out>/data/glue/<task>/validation.tsv``; returns the
    GLUE data dir (``<out>/data/glue``) an evaluator reads through ``read_tsv``."""
    glue_dir = out / "data" / "glue"
    write_tsv(glue_dir / name / "validation.tsv", GLUE_TASKS[name], examples)
    return glue_dir


def pretraining_sentences() -> list[str]:
    """The text the tiny T5 and GPT bases are pre-trained on: SST-2 and CoLA training sentences."""
    return [ex["texts"][0] for name in ("sst2", "cola") for ex in load_glue(name, "train")]
