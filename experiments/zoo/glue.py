"""The real GLUE data the text families train and evaluate on (SST-2, CoLA, RTE), read offline.

Looked up as ``$DELTADCT_DATA_DIR/glue/<task>/<split>.tsv``, else ``<repo>/../shared/data/glue/...``,
else through ``datasets.load_dataset("glue", task)`` (which works offline only from its own cache).
Labels are ints as in the hub's GLUE: RTE 0 = entailment, 1 = not_entailment.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, matthews_corrcoef

from experiments.zoo.common import ZooDataError


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]
    metric: str
    label_words: tuple[str, ...]  # index = label id; used by the text-to-text and causal-LM families


GLUE_TASKS = {
    "sst2": GlueTask("sst2", ("sentence",), "accuracy", ("negative", "positive")),
    "cola": GlueTask("cola", ("sentence",), "matthews_correlation", ("unacceptable", "acceptable")),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), "accuracy", ("entailment", "not_entailment")),
}

Example = dict  # {"texts": tuple[str, ...], "label": int}


def data_root() -> Path:
    """The data dir: ``$DELTADCT_DATA_DIR``, else ``../shared/data`` relative to the repo root."""
    env = os.environ.get("DELTADCT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _parse_label(task: GlueTask, raw: str) -> int:
    raw = raw.strip()
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
    return [{"texts": tuple(r[c] for c in task.text_columns), "label": int(r["label"])} for r in ds]


def load_glue(name: str, split: str) -> list[Example]:
    """All examples of one GLUE split; a clear ZooDataError when neither source has it."""
    task = GLUE_TASKS[name]
    path = data_root() / "glue" / name / f"{split}.tsv"
    if path.is_file():
        return read_tsv(path, task)
    try:
        return _load_from_datasets(task, split)
    except Exception as err:  # any hub/cache failure means the data is simply not available offline
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


def score(metric: str, labels: list[int], predictions: list[int]) -> float:
    """GLUE metric; predictions outside the label set (e.g. unmapped generations) count as wrong."""
    if metric == "accuracy":
        return float(accuracy_score(labels, predictions))
    if metric == "matthews_correlation":
        return float(matthews_corrcoef(labels, predictions))
    raise ValueError(f"unknown metric {metric!r}")


def write_eval_data(out: Path, name: str, examples: list[Example]) -> Path:
    """Write the exact evaluation examples as ``<out>/data/glue/<task>/validation.tsv``; returns the
    GLUE data dir (``<out>/data/glue``) an evaluator reads through ``read_tsv``."""
    glue_dir = out / "data" / "glue"
    write_tsv(glue_dir / name / "validation.tsv", GLUE_TASKS[name], examples)
    return glue_dir


def pretraining_sentences() -> list[str]:
    """The text the tiny T5 and GPT bases are pre-trained on: SST-2 and CoLA training sentences."""
    return [ex["texts"][0] for name in ("sst2", "cola") for ex in load_glue(name, "train")]
